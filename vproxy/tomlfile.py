"""Reading a TOML file (the agent's and the client's config): tomllib on 3.11+, tomli before."""

from typing import Any, Dict

from vproxy.errors import UserError


def load_toml(path: str) -> Dict[str, Any]:
    try:
        import tomllib as toml  # optional: Python 3.11+
    except ImportError:
        try:
            import tomli as toml  # optional: vendored in the .pyz for Python 3.9 and 3.10
        except ImportError:
            raise UserError("reading %s needs the tomli package on Python < 3.11" % path,
                            hint="pip install tomli, or use dist/vproxy.pyz which bundles it") from None
    try:
        with open(path, "rb") as f:
            return toml.load(f)
    except OSError as e:
        raise UserError("cannot read config file %s: %s" % (path, e.strerror)) from None
    except toml.TOMLDecodeError as e:
        raise UserError("config file %s is not valid TOML: %s" % (path, e)) from None
