"""A 512-byte real-mode x86 guest, emitted as machine code from Python.

No assembler is needed at run time: the program below is a list of instructions, each
given as its encoded bytes with the assembly it stands for in a comment. A two-pass
"linker" (`_assemble`) only resolves the few label references (short/near jumps, calls
and absolute addresses). The bytes were checked once against `objdump -b binary
-m i8086 -D` (see tests/test_guests.py for the behavioural checks).

What the guest does (BIOS loads it at 0000:7C00):

1. Sets up segments and a stack, hides the VGA cursor and paints the 80x25 text screen
   white-on-blue (so a VNC screenshot is visibly non-blank and stable: no blinking
   cursor).
2. Initialises COM1 (0x3F8): 115200 baud, 8N1, FIFOs on, DTR/RTS raised, no interrupts.
3. Prints the banner (default ``BANNER``) on COM1 and on the first screen row.
4. Loops forever, polling the UART's line status register and the BIOS keyboard buffer.
   Every byte received on COM1, and every ASCII key typed on the PS/2 keyboard (e.g.
   through VNC), is transformed and written to COM1 and to the screen (from row 3 on,
   wrapping back to row 3 at the bottom; LF starts a new row, other control bytes are
   not drawn):
     - 'a'..'z' become 'A'..'Z';
     - '\\r' is echoed as "\\r\\n";
     - every other byte is echoed unchanged.
   Nothing else is ever written to the serial port, so the output is deterministic:
   the banner once per boot, then only echoes. See `expected_echo`.

Flow control: the guest reads the UART only as fast as it can write the echo (it waits
for THRE before each write). QEMU's 16550 emulation accepts input from its chardev only
while the receive FIFO has room, and stops reading the host socket when the guest does
not drain it, so no byte is lost however fast the host sends; output is likewise held
back when the host does not read.

The disk image is the sector followed by zero padding (64 KiB in all), suitable for
``-drive file=IMAGE,format=raw,if=ide`` (booting from IDE is much faster than from a
floppy).
"""

import os
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

__all__ = [
    "BANNER",
    "DISK_SIZE",
    "build_boot_sector",
    "build_boot_disk",
    "expected_echo",
    "symbols",
]

#: What the guest prints on COM1 once per boot, before any echo.
BANNER = b"vproxy boot-sector guest ready\r\n"

#: Size of the raw disk image written by `build_boot_disk`.
DISK_SIZE = 64 * 1024

_LOAD_ADDRESS = 0x7C00
_COM1 = 0x3F8
_SCREEN_ATTR = 0x1F  # white on blue
_ECHO_ROW_OFFSET = 2 * 160  # byte offset of screen row 2 (80 cols x 2 bytes)
_SCREEN_END = 25 * 160  # 4000: one past the last cell


def _w(value: int) -> bytes:
    """Little-endian 16-bit immediate."""
    return bytes((value & 0xFF, (value >> 8) & 0xFF))


# Program items:
#   ("label", name)
#   ("bytes", b"...", "asm")                     literal encoding
#   ("jcc8", opcode, label, "asm")                 2 bytes: opcode, rel8 (also jmp short EB)
#   ("call16", label, "asm")                       3 bytes: E8 rel16
#   ("imm16", prefix_bytes, label, "asm")          prefix, absolute address of label
#   ("far16", label, "asm")                        EA off16 seg16(0): jmp 0000:label
_Item = Tuple[Any, ...]  # (kind, operands...): what each kind holds is in _size and _assemble


def _program(banner: bytes) -> List[_Item]:
    com = _COM1
    return [
        ("label", "start"),
        ("bytes", b"\xfa", "cli                      ; no interrupts while the stack moves"),
        ("bytes", b"\x31\xc0", "xor ax, ax"),
        ("bytes", b"\x8e\xd8", "mov ds, ax              ; DS = 0 (banner is addressed 0:7Cxx)"),
        ("bytes", b"\x8e\xd0", "mov ss, ax"),
        ("bytes", b"\xbc" + _w(_LOAD_ADDRESS), "mov sp, 0x7C00          ; stack grows down below us"),
        ("far16", "main", "jmp 0x0000:main          ; normalise CS:IP (some BIOSes use 07C0:0000)"),
        ("label", "main"),
        ("bytes", b"\xfb", "sti                      ; BIOS timer/keyboard IRQs needed for int 16h"),
        ("bytes", b"\xfc", "cld                      ; string ops go forward"),
        # --- screen: hide the cursor (int 10h AH=01, CH bit 5 = invisible) ---
        ("bytes", b"\xb4\x01", "mov ah, 0x01"),
        ("bytes", b"\xb9" + _w(0x2000), "mov cx, 0x2000"),
        ("bytes", b"\xcd\x10", "int 0x10                 ; harmless without a VGA BIOS"),
        # --- screen: ES = text buffer, fill 2000 cells with blank white-on-blue ---
        ("bytes", b"\xb8" + _w(0xB800), "mov ax, 0xB800"),
        ("bytes", b"\x8e\xc0", "mov es, ax               ; ES:DI = screen cursor"),
        ("bytes", b"\x31\xff", "xor di, di"),
        ("bytes", b"\xb8" + _w((_SCREEN_ATTR << 8) | 0x20), "mov ax, 0x1F20           ; ' ' white on blue"),
        ("bytes", b"\xb9" + _w(2000), "mov cx, 2000             ; 80 x 25 cells"),
        ("bytes", b"\xf3\xab", "rep stosw"),
        ("bytes", b"\x31\xff", "xor di, di               ; banner goes to row 0"),
        # --- COM1 initialisation ---
        ("bytes", b"\xba" + _w(com + 1), "mov dx, 0x3F9            ; IER"),
        ("bytes", b"\xb0\x00", "mov al, 0x00             ; no UART interrupts (we poll)"),
        ("bytes", b"\xee", "out dx, al"),
        ("bytes", b"\xba" + _w(com + 3), "mov dx, 0x3FB            ; LCR"),
        ("bytes", b"\xb0\x80", "mov al, 0x80             ; DLAB = 1: expose the divisor latch"),
        ("bytes", b"\xee", "out dx, al"),
        ("bytes", b"\xba" + _w(com + 0), "mov dx, 0x3F8            ; DLL"),
        ("bytes", b"\xb0\x01", "mov al, 0x01             ; divisor 1 = 115200 baud"),
        ("bytes", b"\xee", "out dx, al"),
        ("bytes", b"\xba" + _w(com + 1), "mov dx, 0x3F9            ; DLM"),
        ("bytes", b"\xb0\x00", "mov al, 0x00"),
        ("bytes", b"\xee", "out dx, al"),
        ("bytes", b"\xba" + _w(com + 3), "mov dx, 0x3FB            ; LCR"),
        ("bytes", b"\xb0\x03", "mov al, 0x03             ; 8 data bits, no parity, 1 stop, DLAB = 0"),
        ("bytes", b"\xee", "out dx, al"),
        ("bytes", b"\xba" + _w(com + 2), "mov dx, 0x3FA            ; FCR"),
        ("bytes", b"\xb0\xc7", "mov al, 0xC7             ; FIFO on, clear RX/TX, trigger 14"),
        ("bytes", b"\xee", "out dx, al"),
        ("bytes", b"\xba" + _w(com + 4), "mov dx, 0x3FC            ; MCR"),
        ("bytes", b"\xb0\x03", "mov al, 0x03             ; DTR | RTS"),
        ("bytes", b"\xee", "out dx, al"),
        # --- banner ---
        ("imm16", b"\xbe", "banner", "mov si, banner"),
        ("label", "banner_loop"),
        ("bytes", b"\xac", "lodsb                    ; AL = [DS:SI++]"),
        ("bytes", b"\x84\xc0", "test al, al"),
        ("jcc8", 0x74, "banner_done", "jz banner_done          ; NUL ends the string"),
        ("call16", "putc", "call putc"),
        ("jcc8", 0xEB, "banner_loop", "jmp short banner_loop"),
        ("label", "banner_done"),
        ("bytes", b"\xbf" + _w(_ECHO_ROW_OFFSET), "mov di, 320              ; echoes go to the screen from row 2"),
        # --- main loop: poll COM1, then the keyboard ---
        ("label", "poll"),
        ("bytes", b"\xba" + _w(com + 5), "mov dx, 0x3FD            ; LSR"),
        ("bytes", b"\xec", "in al, dx"),
        ("bytes", b"\xa8\x01", "test al, 0x01            ; DR: a byte is waiting"),
        ("jcc8", 0x74, "keyboard", "jz keyboard"),
        ("bytes", b"\xba" + _w(com + 0), "mov dx, 0x3F8            ; RBR"),
        ("bytes", b"\xec", "in al, dx                ; AL = received byte"),
        ("label", "echo"),
        ("bytes", b"\x3c\x61", "cmp al, 'a'"),
        ("jcc8", 0x72, "send", "jb send"),
        ("bytes", b"\x3c\x7a", "cmp al, 'z'"),
        ("jcc8", 0x77, "send", "ja send"),
        ("bytes", b"\x2c\x20", "sub al, 0x20             ; lowercase -> uppercase"),
        ("label", "send"),
        ("call16", "putc", "call putc                ; AL is preserved"),
        ("bytes", b"\x3c\x0d", "cmp al, 0x0D"),
        ("jcc8", 0x75, "poll", "jne poll"),
        ("bytes", b"\xb0\x0a", "mov al, 0x0A             ; CR is followed by LF"),
        ("call16", "putc", "call putc"),
        ("jcc8", 0xEB, "poll", "jmp short poll"),
        ("label", "keyboard"),
        ("bytes", b"\xb4\x01", "mov ah, 0x01"),
        ("bytes", b"\xcd\x16", "int 0x16                 ; ZF = 1: no key waiting"),
        ("jcc8", 0x74, "poll", "jz poll"),
        ("bytes", b"\x30\xe4", "xor ah, ah"),
        ("bytes", b"\xcd\x16", "int 0x16                 ; AL = ASCII (0 for special keys)"),
        ("bytes", b"\x84\xc0", "test al, al"),
        ("jcc8", 0x74, "poll", "jz poll                  ; ignore arrows, F-keys, ..."),
        ("jcc8", 0xEB, "echo", "jmp short echo"),
        # --- putc: AL -> COM1 (waiting for THRE) and the screen at ES:DI ---
        ("label", "putc"),
        ("bytes", b"\x50", "push ax"),
        ("bytes", b"\xba" + _w(com + 5), "mov dx, 0x3FD            ; LSR"),
        ("label", "putc_wait"),
        ("bytes", b"\xec", "in al, dx"),
        ("bytes", b"\xa8\x20", "test al, 0x20            ; THRE: transmitter can take a byte"),
        ("jcc8", 0x74, "putc_wait", "jz putc_wait"),
        ("bytes", b"\x58", "pop ax"),
        ("bytes", b"\xba" + _w(com + 0), "mov dx, 0x3F8            ; THR"),
        ("bytes", b"\xee", "out dx, al"),
        ("bytes", b"\x3c\x0a", "cmp al, 0x0A"),
        ("jcc8", 0x74, "putc_newline", "je putc_newline"),
        ("bytes", b"\x3c\x20", "cmp al, 0x20"),
        ("jcc8", 0x72, "putc_done", "jb putc_done            ; other control bytes are not drawn"),
        ("bytes", b"\xb4" + bytes((_SCREEN_ATTR,)), "mov ah, 0x1F"),
        ("bytes", b"\xab", "stosw                    ; [ES:DI] = AX, DI += 2"),
        ("label", "putc_wrap"),
        ("bytes", b"\x81\xff" + _w(_SCREEN_END), "cmp di, 4000"),
        ("jcc8", 0x72, "putc_done", "jb putc_done"),
        ("bytes", b"\xbf" + _w(_ECHO_ROW_OFFSET), "mov di, 320              ; wrap back to row 2"),
        ("label", "putc_done"),
        ("bytes", b"\xc3", "ret"),
        # LF on the screen: DI = (DI / 160 + 1) * 160, the start of the next row
        ("label", "putc_newline"),
        ("bytes", b"\x50", "push ax"),
        ("bytes", b"\x97", "xchg ax, di               ; AX = screen offset"),
        ("bytes", b"\xb2\xa0", "mov dl, 160              ; bytes per row"),
        ("bytes", b"\xf6\xf2", "div dl                   ; AL = row (AX < 4000, so it fits)"),
        ("bytes", b"\xfe\xc0", "inc al                   ; next row"),
        ("bytes", b"\xf6\xe2", "mul dl                   ; AX = AL * 160"),
        ("bytes", b"\x97", "xchg ax, di"),
        ("bytes", b"\x58", "pop ax                   ; AL = 0x0A again"),
        ("jcc8", 0xEB, "putc_wrap", "jmp short putc_wrap"),
        # --- data ---
        ("label", "banner"),
        ("bytes", banner + b"\x00", "db BANNER, 0"),
    ]


def _size(item: _Item) -> int:
    kind = item[0]
    if kind == "label":
        return 0
    if kind == "bytes":
        return len(item[1])
    if kind == "jcc8":
        return 2
    if kind == "call16":
        return 3
    if kind == "imm16":
        return len(item[1]) + 2
    if kind == "far16":
        return 5
    raise ValueError("unknown item kind %r" % (kind,))


def _labels(items: List[_Item]) -> Dict[str, int]:
    labels = {}  # type: Dict[str, int]
    offset = 0
    for item in items:  # pass 1: label offsets
        if item[0] == "label":
            if item[1] in labels:
                raise ValueError("duplicate label %r" % (item[1],))
            labels[item[1]] = offset
        offset += _size(item)
    return labels


def _assemble(items: List[_Item]) -> bytes:
    labels = _labels(items)
    out = bytearray()
    for item in items:  # pass 2: emit
        kind = item[0]
        end = len(out) + _size(item)
        if kind == "bytes":
            out += item[1]
        elif kind == "jcc8":
            rel = labels[item[2]] - end
            if not -128 <= rel <= 127:
                raise ValueError("short jump to %r out of range (%d)" % (item[2], rel))
            out += bytes((item[1], rel & 0xFF))
        elif kind == "call16":
            out += b"\xe8" + _w(labels[item[1]] - end)
        elif kind == "imm16":
            out += item[1] + _w(_LOAD_ADDRESS + labels[item[2]])
        elif kind == "far16":
            out += b"\xea" + _w(_LOAD_ADDRESS + labels[item[1]]) + _w(0)
        assert len(out) == end
    return bytes(out)


def build_boot_sector(banner: bytes = BANNER) -> bytes:
    """Return the 512-byte boot sector (ending in 0x55 0xAA).

    *banner* is printed on COM1 (and the screen's first row) once per boot; it must not
    contain NUL and must fit in the sector (about 300 bytes).
    """
    if isinstance(banner, str):
        banner = banner.encode("ascii")
    if b"\x00" in banner:
        raise ValueError("the banner must not contain NUL bytes")
    code = _assemble(_program(banner))
    if len(code) > 510:
        raise ValueError("banner too long: the program needs %d of 510 bytes" % len(code))
    return code + bytes(510 - len(code)) + b"\x55\xaa"


def symbols(banner: bytes = BANNER) -> Dict[str, int]:
    """Linear address (0x7C00 + offset) of each label of the program, e.g. ``poll``
    (the main loop) and ``putc``: lets a test see where the vCPU is."""
    if isinstance(banner, str):
        banner = banner.encode("ascii")
    return {k: _LOAD_ADDRESS + v for k, v in _labels(_program(banner)).items()}


def build_boot_disk(path: "Union[str, os.PathLike[str]]", banner: bytes = BANNER) -> Path:
    """Write the raw disk image (boot sector + zero padding, `DISK_SIZE` bytes) to *path*.

    Boot it with ``-drive file=PATH,format=raw,if=ide`` (e.g. ``-machine pc``).
    The file is written atomically (temporary file + rename). Returns the path.
    """
    path = Path(path)
    image = build_boot_sector(banner)
    image += bytes(DISK_SIZE - len(image))
    tmp = path.with_name(path.name + ".tmp%d" % os.getpid())
    with open(tmp, "wb") as f:
        f.write(image)
    os.replace(tmp, path)
    return path


def expected_echo(data: bytes) -> bytes:
    """What the guest writes back for *data* sent to it (not counting the banner)."""
    out = bytearray()
    for b in data:
        if 0x61 <= b <= 0x7A:
            out.append(b - 0x20)
        elif b == 0x0D:
            out += b"\r\n"
        else:
            out.append(b)
    return bytes(out)
