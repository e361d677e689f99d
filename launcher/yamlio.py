"""YAML that means what the user typed: no base-60 integers, and `1e-4` is a float.

PyYAML follows YAML 1.1, where `time: 24:00:00` is the integer 86400 and `lr: 1e-4` a string.
This loader drops the sexagesimal rule (so times stay strings) and reads exponent floats without
a dot, as YAML 1.2 does. It also refuses what no spec, profile or matrix needs and what would make
launcher hang or crash: a key given twice in one mapping (PyYAML keeps the last silently), aliases
that expand beyond MAX_NODES values ("billion laughs"), and nesting deeper than MAX_DEPTH.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import SpecError


class _Loader(yaml.SafeLoader):
    pass


# Copy the resolver table so SafeLoader itself is untouched, then replace int and float rules.
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_INT = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
    r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("+-")
    if text.startswith("0b"):
        return sign * int(text[2:], 2)
    if text.startswith("0x"):
        return sign * int(text[2:], 16)
    if text.startswith("0o"):
        return sign * int(text[2:], 8)
    return sign * int(text, 10)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)

MAX_DEPTH = 64  # a spec is 3-4 levels deep; zero.extra a few more
MAX_NODES = 100_000  # values after aliases are expanded


def _refuse(source: str, node: yaml.Node, problem: str) -> SpecError:
    mark = node.start_mark
    return SpecError(f"{source}:{mark.line + 1}:{mark.column + 1}: {problem}")


def _check_document(node: yaml.Node, source: str) -> None:
    """Duplicate keys, expanded size and depth of a composed document, without recursion: an alias is
    the same node object again, so sizes are counted once per node and multiplied by its uses."""
    size: dict[int, int] = {}
    # iterative post-order walk; depth counts the nesting as written (aliases included)
    stack: list[tuple[yaml.Node, int, bool]] = [(node, 1, False)]
    while stack:
        n, depth, done = stack.pop()
        if depth > MAX_DEPTH:
            raise _refuse(source, n, f"nested more than {MAX_DEPTH} levels deep; a run spec needs a few levels")
        children: list[yaml.Node] = []
        if isinstance(n, yaml.MappingNode):
            if not done:
                seen: dict[Any, yaml.Node] = {}
                for k, _ in n.value:
                    if isinstance(k, yaml.ScalarNode):
                        key = (k.tag, k.value)
                        if key in seen:
                            first = seen[key].start_mark.line + 1
                            raise _refuse(source, k, f"key {_short(k.value)!r} is given twice in one mapping "
                                                     f"(lines {first} and {k.start_mark.line + 1}); keep one")
                        seen[key] = k
            children = [c for kv in n.value for c in kv]
        elif isinstance(n, yaml.SequenceNode):
            children = list(n.value)
        if done:
            size[id(n)] = 1 + sum(size[id(c)] for c in children)
            if size[id(n)] > MAX_NODES:
                raise _refuse(source, n, f"expands to more than {MAX_NODES:,} values (aliases: '*name' repeats "
                                         f"'&name'); write the values out or use fewer aliases")
            continue
        if id(n) in size:
            continue
        stack.append((n, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in size)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def quote(value: Any, limit: int = 80) -> str:
    """repr() of an input value for an error message, bounded: nested and shared (aliased) values are cut
    before they are expanded."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset, r.maxstring, r.maxother = 3, 6, 6, 6, 6, limit, limit
    return _short(r.repr(value), limit)


def loads(text: str, source: str = "<string>") -> Any:
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # its reader refuses control characters here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_document(node, source)
        return loader.construct_document(node)
    except RecursionError:
        # PyYAML's parser and composer recurse once per level: flow brackets thousands deep end here
        raise SpecError(f"{source}: nested too deeply (more than {MAX_DEPTH} levels); a run spec needs a few "
                        f"levels") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{where}: not valid YAML ({_short(problem, 200)}); fix the syntax at that line") from None
    finally:
        if loader is not None:
            loader.dispose()


MAX_FILE_BYTES = 16 << 20  # a spec, profile or matrix file is a few KiB


def load_file(path: str | Path) -> Any:
    p = Path(path)
    try:
        if p.exists() and not p.is_dir() and not p.is_file():  # a FIFO or a device would be read for ever
            raise SpecError(f"spec file {str(p)!r} is not a regular file; give the path of a YAML file")
        if p.is_file() and p.stat().st_size > MAX_FILE_BYTES:
            raise SpecError(f"spec file {str(p)!r} is larger than {MAX_FILE_BYTES >> 20} MiB; a YAML run spec, "
                            f"profile or matrix is a few KiB")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"spec file {str(p)!r} does not exist; give the path of a YAML run spec") from None
    except IsADirectoryError:
        raise SpecError(f"spec file {str(p)!r} is a directory; give the path of a YAML run spec") from None
    except UnicodeDecodeError:
        raise SpecError(f"spec file {str(p)!r} is not UTF-8 text; give a YAML run spec") from None
    except OSError as exc:  # permission denied, a symlink loop, a name too long
        raise SpecError(f"spec file {str(p)[:300]!r} cannot be read ({exc.strerror or exc})") from None
    return loads(text, source=str(p))


def dumps(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
