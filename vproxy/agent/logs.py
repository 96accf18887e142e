"""Running the agent as a service: structured logs (`serve --log-format json`).

In JSON mode every log line is one JSON object:

    {"time": "2026-11-26T10:00:00.123Z", "level": "info", "logger": "vproxy.audit",
     "message": "identity=alice vm=web1 ...", "identity": "alice", "vm": "web1", ...}

Always "time" (UTC, ISO 8601, milliseconds), "level", "logger" and "message"; then the
record's fields, if the caller gave some with ``extra={"fields": {...}}`` (the audit
lines carry identity, vm, channel, mode, result, bytes_in, bytes_out, duration), and
"exception" with the traceback, if any. Output is ASCII: hostile names are escaped by
JSON, never split across lines.
"""

import json
import logging
import sys
import time
from typing import Any, Dict, Optional, TextIO

LOG_FORMATS = ("text", "json")
_RESERVED = ("time", "level", "logger", "message")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(record_fields(record, self), default=str)


def record_fields(record: logging.LogRecord, formatter: Optional[logging.Formatter] = None
                  ) -> Dict[str, Any]:
    out: Dict[str, Any] = {
        "time": _iso(record.created),
        "level": record.levelname.lower(),
        "logger": record.name,
        "message": record.getMessage(),
    }
    fields = getattr(record, "fields", None)
    if isinstance(fields, dict):
        for key, value in fields.items():
            out[key if key not in _RESERVED else "field_" + key] = value
    if record.exc_info:
        out["exception"] = (formatter or logging.Formatter()).formatException(record.exc_info)
    return out


def _iso(created: float) -> str:
    return "%s.%03dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)),
                         int(created * 1000) % 1000)


def use_log_format(log_format: str) -> None:
    """Give every handler of the root logger the formatter of `log_format`."""
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())


def formatter_for(log_format: str, text_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(text_format)


def say(message: str, log_format: str = "text", level: str = "info",
        stream: Optional[TextIO] = None, **fields: Any) -> None:
    """A line the agent always prints on stderr, whatever the verbosity ("listening on",
    reload results): "vproxy: MESSAGE" in text mode, a JSON object in JSON mode."""
    stream = stream or sys.stderr
    if log_format == "json":
        line = {"time": _iso(time.time()), "level": level, "logger": "vproxy",
                "message": message}
        line.update(fields)
        stream.write(json.dumps(line, default=str) + "\n")
    else:
        stream.write("vproxy: %s\n" % message)
    stream.flush()


__all__ = ["LOG_FORMATS", "JsonFormatter", "record_fields", "use_log_format",
           "formatter_for", "say"]
