"""The device registry: the authoritative source of each device's attributes and lifecycle status.

The embedded default is a YAML file under ``policies/``; anything with
``lookup`` and ``revision`` (for example a Redis-backed registry) can take its place.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import re
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import yaml

from pdp.core.layered import releasing
from pdp.errors import SourceError
from pdp.core.identity import device_id_problem, normalize_fingerprint
from pdp.core.topics import level_value_problem
from pdp.registry.device import ATTRIBUTE_FIELDS, STATUSES, CertBinding, Device

log = logging.getLogger(__name__)

_STATUS = {status: status for status in STATUSES}
_NO_FINGERPRINTS: frozenset[str] = frozenset()
_KNOWN_FIELDS = frozenset({"id", "status", "fingerprints", "certificates", "gateway", *ATTRIBUTE_FIELDS})
# The fields of one ``certificates:`` item (a binding): only ``fingerprint`` is required.
BINDING_FIELDS = ("fingerprint", "serial", "issuer", "expires", "not_after")


@dataclass(frozen=True)
class FileRegistry:
    devices: Mapping[str, Device]
    revision: str
    path: str = ""
    lines: Mapping[str, int] = field(default_factory=dict)  # device id -> its line, for messages
    # The fast reader's items (indent, text) -> Device, so the next version re-reads only the items that changed.
    chunks: Mapping[tuple[int, str], Device] = field(default_factory=dict, compare=False, repr=False)

    def lookup(self, device_id: str) -> Device | None:
        return self.devices.get(device_id)

    def __len__(self) -> int:
        return len(self.devices)

    def releasing(self, successor: FileRegistry | None = None) -> Generator[None, None, None]:
        """Empty a replaced registry in steps, yielding in between (see ``decision_point.releasing``);
        what ``successor`` shares with it survives."""
        for table, kept in ((self.chunks, successor.chunks if successor else None),
                            (self.lines, successor.lines if successor else None),
                            (self.devices, successor.devices if successor else None)):
            yield from releasing(table, kept)


def yaml_error(path: str, exc: yaml.YAMLError) -> SourceError:
    """PyYAML's error as one line: where it failed, and where the construct it was reading began."""
    mark = getattr(exc, "problem_mark", None)
    reason = f"invalid YAML: {getattr(exc, 'problem', None) or exc}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        reason += f" ({context} at line {context_mark.line + 1})"
    return SourceError(path, mark.line + 1 if mark else None, reason)


def _scalar(node: yaml.Node, path: str, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise SourceError(path, node.start_mark.line + 1, f"{what} must be a single value")
    return str(node.value)


# One field of a device, as both readers hand it to ``_build_device``: (name, its line, value), the value
# being the field's text, or for a sequence its items as (text, line), or a SourceError to raise when the
# value is read (the node reader's "must be a single value" / "must be a list" cases, in their original order).
Entry = tuple[str, int, "str | list[tuple[str, int]] | list[tuple[dict[str, tuple[str, int]], int]] | SourceError"]
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,127}")  # certainly passes level_value_problem


def _value_problem(value: str) -> str | None:
    return None if _SAFE_VALUE.fullmatch(value) else level_value_problem(value)


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; without a zone it is UTC. ValueError with the text when unreadable."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time (e.g. 2026-12-01T00:00:00Z)") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def format_time(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _binding(item: dict[str, tuple[str, int]], line: int, path: str) -> CertBinding:
    for key, (_, key_line) in item.items():
        if key not in BINDING_FIELDS:
            raise SourceError(path, key_line, f"unknown certificate field {key!r} (known: {', '.join(BINDING_FIELDS)})")
    if "fingerprint" not in item:
        raise SourceError(path, line, "certificate is missing field 'fingerprint'")
    values: dict[str, object] = {}
    for key, (text, key_line) in item.items():
        try:
            if key == "fingerprint":
                values[key] = normalize_fingerprint(text)
            elif key in ("expires", "not_after"):
                values[key] = parse_time(text) if text else None
            else:
                values[key] = text
        except ValueError as exc:
            raise SourceError(path, key_line, f"certificate {key}: {exc}") from None
    return CertBinding(**values)  # type: ignore[arg-type]


def _build_device(entries: Iterable[Entry], line: int, path: str, intern: dict[str, str]) -> Device:
    """The checks every device passes, in one order for both readers, so both give the same errors.

    ``intern`` maps each attribute value to one shared string: 100,000 devices name a few hundred
    types, locations, purposes and owners, and each would otherwise hold its own copy.
    """
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    fingerprints: set[str] = set()
    bindings: list[CertBinding] | None = None
    for key, key_line, value in entries:
        if key not in _KNOWN_FIELDS:
            raise SourceError(path, key_line, f"unknown field {key!r} (known: {', '.join(sorted(_KNOWN_FIELDS))})")
        if key in values or (key == "fingerprints" and fingerprints) or (key == "certificates" and bindings is not None):
            raise SourceError(path, key_line, f"field {key!r} given twice")
        if key == "certificates":
            if isinstance(value, SourceError):
                raise value
            if not isinstance(value, list):
                raise SourceError(path, key_line, "certificates must be a list of mappings with a fingerprint")
            bindings = []
            for item, item_line in value:
                if isinstance(item, SourceError):
                    raise item
                binding = _binding(item, item_line, path)  # type: ignore[arg-type]
                if any(b.fingerprint == binding.fingerprint for b in bindings):
                    raise SourceError(path, item_line, "certificate bound twice")
                bindings.append(binding)
            continue
        if key == "fingerprints":
            if not isinstance(value, list):
                raise SourceError(path, key_line, "fingerprints must be a list of SHA-256 fingerprints")
            for item, item_line in value:
                if isinstance(item, SourceError):
                    raise item
                try:
                    fingerprints.add(normalize_fingerprint(item))
                except ValueError as exc:
                    raise SourceError(path, item_line, str(exc)) from None
            continue
        if isinstance(value, SourceError):
            raise value
        if not isinstance(value, str):
            raise SourceError(path, key_line, f"field {key!r} must be a single value")
        values[key] = value
        lines[key] = key_line
    for required in ("id", "status", *ATTRIBUTE_FIELDS):
        if required not in values:
            raise SourceError(path, line, f"device is missing field {required!r}")
    for name in ("id", *ATTRIBUTE_FIELDS):
        value = values[name]
        if value in intern:  # already checked (interned values are valid ones)
            values[name] = intern[value]
            continue
        problem = _value_problem(value) if name != "id" else device_id_problem(value)
        if problem is not None:
            raise SourceError(path, lines[name], f"{name} {value!r} {problem}")
        if name != "id":
            intern[value] = value
    status = values["status"]
    if status not in STATUSES:
        raise SourceError(path, lines["status"], f"status {status!r} is not one of {', '.join(STATUSES)}")
    gateway = values.get("gateway", "")
    if gateway:
        problem = device_id_problem(gateway)
        if problem is not None:
            raise SourceError(path, lines["gateway"], f"gateway {gateway!r} {problem}")
        if gateway == values["id"]:
            raise SourceError(path, lines["gateway"], "a device cannot be its own gateway")
    if bindings or gateway:
        bound = {b.fingerprint for b in bindings or ()}
        overlap = fingerprints & bound
        if overlap:
            raise SourceError(path, line, f"fingerprint {min(overlap)} is under both fingerprints and certificates")
        return Device(values["id"], values["type"], values["location"], values["purpose"], values["owner"],
                      _STATUS[status], frozenset(fingerprints | bound), tuple(bindings or ()), gateway)
    return Device(values["id"], values["type"], values["location"], values["purpose"], values["owner"],
                  _STATUS[status], frozenset(fingerprints) if fingerprints else _NO_FINGERPRINTS)


def _node_entries(node: yaml.MappingNode, path: str) -> Iterator[Entry]:
    for key_node, value_node in node.value:
        key = _scalar(key_node, path, "a field name")
        key_line = key_node.start_mark.line + 1
        value: str | list[tuple[str, int]] | SourceError
        if key == "fingerprints" and isinstance(value_node, yaml.SequenceNode):
            value = [(item.value, item.start_mark.line + 1) if isinstance(item, yaml.ScalarNode) else
                     (SourceError(path, item.start_mark.line + 1, "a fingerprint must be a single value"),  # type: ignore[misc]
                      item.start_mark.line + 1) for item in value_node.value]
        elif key == "fingerprints":
            value = ""  # not a list: refused by _build_device at this key's line
        elif key == "certificates":
            value = _certificate_items(value_node, path)  # type: ignore[assignment]
        elif isinstance(value_node, yaml.ScalarNode):
            value = str(value_node.value)
        else:
            value = SourceError(path, value_node.start_mark.line + 1, f"field {key!r} must be a single value")
        yield key, key_line, value


def _certificate_items(node: yaml.Node, path: str) -> list[tuple[object, int]] | SourceError:
    """``certificates:`` as (field -> (text, line), line) per item; the fast reader leaves these to YAML."""
    if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
        return []
    if not isinstance(node, yaml.SequenceNode):
        return SourceError(path, node.start_mark.line + 1, "certificates must be a list of mappings with a fingerprint")
    items: list[tuple[object, int]] = []
    for item in node.value:
        line = item.start_mark.line + 1
        if not isinstance(item, yaml.MappingNode):
            items.append((SourceError(path, line, "each certificate must be a mapping with a fingerprint"), line))
            continue
        fields: dict[str, tuple[str, int]] = {}
        for key_node, value_node in item.value:
            key = _scalar(key_node, path, "a certificate field name")
            fields[key] = (_scalar(value_node, path, f"certificate field {key!r}"), value_node.start_mark.line + 1)
        items.append((fields, line))
    return items


def _device_from_node(node: yaml.Node, path: str, intern: dict[str, str] | None = None) -> Device:
    line = node.start_mark.line + 1
    if not isinstance(node, yaml.MappingNode):
        raise SourceError(path, line, "each device must be a mapping with id, type, location, purpose, owner, status")
    return _build_device(_node_entries(node, path), line, path, {} if intern is None else intern)
# -- the fast reader ---------------------------------------------------------------------------------
#
# Registries are written by tools, one device per block or flow mapping, one field per line. The fast
# reader accepts exactly that subset of YAML, item by item, and reuses the Device of every item whose
# text is unchanged since the previous version; anything outside the subset (anchors, tags, multi-line
# or escaped strings, unusual indentation, tabs, CR, non-printable characters) sends the whole file to
# the YAML reader, which remains the reference for meaning and for the wording of YAML errors.

_PLAIN = r"[A-Za-z0-9_][A-Za-z0-9_.@-]*"  # a plain scalar whose text is its value in any context
_DQ = r'"[^"\\\x00-\x1f\x7f-\x9f]*"'  # double-quoted, no escapes
_SQ = r"'[^'\x00-\x1f\x7f-\x9f]*'"  # single-quoted, no '' inside
_SCALAR = rf"(?:{_PLAIN}|{_DQ}|{_SQ})"
_FLOW_LIST = rf"\[ *(?:{_SCALAR} *(?:, *{_SCALAR} *)*,? *)?\]"
_COMMENT = r"(?: +#[^\n]*)?"
_LINE = re.compile(  # after the indent: 'key: value', 'key:' (a block list follows), '- value', or nothing
    rf"(?:(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?: +(?P<value>{_SCALAR}|{_FLOW_LIST}))?|- +(?P<item>{_SCALAR}))"
    rf"{_COMMENT} *")
_BLANK = re.compile(r" *(?:#[^\n]*)?")
_FLOW_MAP = re.compile(rf"\{{ *(?P<body>(?:[A-Za-z_][A-Za-z0-9_]*: +(?:{_SCALAR}|{_FLOW_LIST}) *, *)*"
                       rf"[A-Za-z_][A-Za-z0-9_]*: +(?:{_SCALAR}|{_FLOW_LIST}) *,? *)\}}{_COMMENT} *")
_FLOW_PAIR = re.compile(rf"([A-Za-z_][A-Za-z0-9_]*): +({_SCALAR}|{_FLOW_LIST}) *(?:,|$)")
_LIST_ITEM = re.compile(rf"({_SCALAR}) *(?:,|$)")
_HEADER = re.compile(r"(?:[ ]*(?:#[^\n]*)?\n)*devices: *(?:#[^\n]*)?\n((?:[ ]*(?:#[^\n]*)?\n)*)( *)- ")
# What PyYAML's reader accepts, minus tab and CR (left to the YAML reader): anything else goes there.
_OUTSIDE_SUBSET = re.compile("[^\n\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]")


# Large texts are scanned, split and hashed this many characters at a time. Each step is one C call that holds
# the GIL; a reload runs in a worker thread, and over a whole 10 MB registry one such call (the character
# scan) held the broker's event loop for 70 ms. In pieces, the loop gets the GIL back between them.
_PIECE = 1 << 16


def _outside_subset(text: str) -> bool:
    return any(_OUTSIDE_SUBSET.search(text, i, i + _PIECE) for i in range(0, len(text), _PIECE))


def _split(text: str, sep: str) -> list[str]:
    """``text.split(sep)``, a piece at a time (see _PIECE)."""
    out: list[str] = []
    start = 0
    while True:
        cut = text.find(sep, start + _PIECE) if start + _PIECE < len(text) else -1
        if cut < 0:
            out += text[start:].split(sep)
            return out
        out += text[start:cut].split(sep)
        start = cut + len(sep)


def text_revision(text: str) -> str:
    """The first 12 hex digits of the SHA-256 of the UTF-8 text, encoded a piece at a time (see _PIECE)."""
    digest = hashlib.sha256()
    for i in range(0, len(text), _PIECE):
        digest.update(text[i:i + _PIECE].encode())
    return digest.hexdigest()[:12]


class _NotSimple(Exception):
    """This file is outside the fast reader's subset; read it with the YAML reader."""


def _unquote(text: str) -> str:
    return text[1:-1] if text[:1] in "\"'" else text


def _flow_list(text: str, line: int) -> list[tuple[str, int]]:
    inner = text[1:-1].strip()
    items: list[tuple[str, int]] = []
    pos = 0
    while pos < len(inner):
        match = _LIST_ITEM.match(inner, pos)
        if match is None:
            raise _NotSimple
        items.append((_unquote(match.group(1)), line))
        pos = match.end()
        while pos < len(inner) and inner[pos] == " ":
            pos += 1
    return items


def _value(text: str, line: int) -> str | list[tuple[str, int]]:
    return _flow_list(text, line) if text[:1] == "[" else _unquote(text)


_BLANK_LINE = (-1, "", None, None)
LineParse = tuple[int, str, "str | list[str] | None", "str | None"]  # column, key, value (None: 'key:'), item


def _parse_line(line: str) -> LineParse:
    text = line.lstrip(" ")
    if not text or text[0] == "#":
        return _BLANK_LINE
    match = _LINE.fullmatch(text)
    if match is None:
        raise _NotSimple
    key, value, item = match.group("key", "value", "item")
    column = len(line) - len(text)
    if item is not None:
        return column, "", None, _unquote(item)
    if value is None:
        return column, key, None, None
    if value[:1] == "[":
        return column, key, [text for text, _ in _flow_list(value, 0)], None
    return column, key, _unquote(value), None


def _chunk_entries(chunk: str, indent: int, first: int, memo: dict[str, LineParse]) -> list[Entry]:
    """The fields of one item: ``chunk`` is its text after ``- ``, ``first`` the line it starts on.

    ``memo`` holds lines already parsed in this file: most lines ('    status: active') recur thousands of times.
    """
    lines = chunk.split("\n")
    head = lines[0]
    extra = len(head) - len(head.lstrip(" "))
    inner = indent + 2 + extra  # the column of the item's keys
    entries: list[Entry] = []
    if head[extra:extra + 1] == "{":
        match = _FLOW_MAP.fullmatch(head, extra)
        if match is None:
            raise _NotSimple
        body, pos = match.group("body"), 0
        while pos < len(body):
            pair = _FLOW_PAIR.match(body, pos)
            if pair is None:
                raise _NotSimple
            entries.append((pair.group(1), first, _value(pair.group(2), first)))
            pos = pair.end()
            while pos < len(body) and body[pos] == " ":
                pos += 1
        if any(_BLANK.fullmatch(line) is None for line in lines[1:]):
            raise _NotSimple
        return entries
    lines[0] = " " * (indent + 2) + head
    block: list[tuple[str, int]] | None = None  # the block list being read, after 'fingerprints:'
    block_column = -1
    for number, line in enumerate(lines):
        parsed = memo.get(line)
        if parsed is None:
            parsed = memo[line] = _parse_line(line)
        column, key, value, item = parsed
        if column < 0:
            continue
        if item is not None:  # '- value': an item of the block list just opened, all at one column >= its key's
            if block is None or column < inner or block_column not in (-1, column):
                raise _NotSimple
            block_column = column
            block.append((item, first + number))
            continue
        if column != inner or (block is not None and not block):
            raise _NotSimple  # a nested mapping, or 'key:' with no list after it: the YAML reader's cases
        block = None
        if value is None:
            if key != "fingerprints":
                raise _NotSimple
            block, block_column = [], -1
            entries.append((key, first + number, block))
        elif isinstance(value, list):
            entries.append((key, first + number, [(text, first + number) for text in value]))
        else:
            entries.append((key, first + number, value))
    if block is not None and not block:
        raise _NotSimple
    return entries


_SAFE_PLAIN = r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,127}"  # a plain value level_value_problem accepts
_FP_TEXT = r"(?:sha256:)?[0-9a-fA-F]{64}"


@lru_cache(maxsize=8)
def _canonical(indent: int) -> re.Pattern[str]:
    """An item exactly as tools write it (the README's field order, plain values, one fingerprint or
    none): matched in one step, without the line-by-line reader. Anything else takes the general path."""
    pad = "\n" + " " * (indent + 2)
    fields = "".join(f"{pad}{name}: ({_SAFE_PLAIN})" for name in ("type", "location", "purpose", "owner"))
    return re.compile(rf"id: ({_SAFE_PLAIN}){fields}{pad}status: ([a-z]+)"
                      rf"(?:{pad}fingerprints: \[\"({_FP_TEXT})\"\])?\n?")


def _parse_simple(text: str, path: str, previous: Mapping[tuple[int, str], Device]) -> FileRegistry:
    """The fast reader; raises _NotSimple when the file is outside its subset."""
    if _outside_subset(text) or not text.endswith("\n"):
        raise _NotSimple
    header = _HEADER.match(text)
    if header is None:
        raise _NotSimple
    indent = len(header.group(2))
    line = text.count("\n", 0, header.end()) + 1  # the first item's line
    items = _split(text[header.end():], "\n" + " " * indent + "- ")
    devices: dict[str, Device] = {}
    first_line: dict[str, int] = {}
    chunks: dict[tuple[int, str], Device] = {}
    intern: dict[str, str] = {}
    memo: dict[str, LineParse] = {}
    canonical = _canonical(indent).fullmatch
    shared = intern.setdefault
    for chunk in items:
        key = (indent, chunk)
        device = previous.get(key)
        if device is None:
            match = canonical(chunk)
            if match is not None and match.group(6) in _STATUS:
                device_id, dtype, location, purpose, owner, status, fingerprint = match.groups()
                device = Device(device_id, shared(dtype, dtype), shared(location, location),
                                shared(purpose, purpose), shared(owner, owner), _STATUS[status],
                                frozenset((normalize_fingerprint(fingerprint),)) if fingerprint else _NO_FINGERPRINTS)
            else:
                device = _build_device(_chunk_entries(chunk, indent, line, memo), line, path, intern)
        chunks[key] = device
        if device.device_id in devices:
            raise SourceError(path, line, f"device {device.device_id!r} already defined at line {first_line[device.device_id]}")
        devices[device.device_id] = device
        first_line[device.device_id] = line
        line += chunk.count("\n") + 1
    revision = text_revision(text)
    return FileRegistry(devices=devices, revision=revision, path=path, lines=first_line, chunks=chunks)


def _parse_yaml(text: str, path: str) -> FileRegistry:
    """The reference reader: YAML's node tree, every value at its line."""
    try:
        root = _compose(text)
    except yaml.YAMLError as exc:
        raise yaml_error(path, exc) from None
    if root is None:
        raise SourceError(path, None, "registry is empty; expected 'devices:' with a list of devices")
    if not isinstance(root, yaml.MappingNode):
        raise SourceError(path, root.start_mark.line + 1, "expected a mapping with a 'devices:' list")
    device_nodes: list[yaml.Node] | None = None
    for key_node, value_node in root.value:
        key = _scalar(key_node, path, "a top-level key")
        if key != "devices":
            raise SourceError(path, key_node.start_mark.line + 1, f"unknown top-level key {key!r}; expected 'devices'")
        if isinstance(value_node, yaml.ScalarNode) and value_node.value in ("", "~", "null"):
            device_nodes = []
        elif not isinstance(value_node, yaml.SequenceNode):
            raise SourceError(path, value_node.start_mark.line + 1, "'devices' must be a list")
        else:
            device_nodes = list(value_node.value)
    if device_nodes is None:
        raise SourceError(path, None, "missing 'devices:' list")
    devices: dict[str, Device] = {}
    first_line: dict[str, int] = {}
    intern: dict[str, str] = {}
    for node in device_nodes:
        device = _device_from_node(node, path, intern)
        line = node.start_mark.line + 1
        if device.device_id in devices:
            raise SourceError(path, line, f"device {device.device_id!r} already defined at line {first_line[device.device_id]}")
        devices[device.device_id] = device
        first_line[device.device_id] = line
    revision = text_revision(text)
    return FileRegistry(devices=devices, revision=revision, path=path, lines=first_line)


def _compose(text: str) -> yaml.Node | None:
    """libyaml's composer when present (same marks, a fraction of the time); PyYAML's own for its error text.

    The collector is paused meanwhile: the node tree is hundreds of thousands of containers that only
    grow, and generational collections over them make a large registry quadratic.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        if getattr(yaml, "CSafeLoader", None) is not None:
            try:
                return yaml.compose(text, Loader=yaml.CSafeLoader)
            except yaml.YAMLError:
                pass  # read again below, so that the message is PyYAML's, as it always was
        return yaml.compose(text, Loader=yaml.SafeLoader)
    finally:
        if enabled:
            gc.enable()


_last: FileRegistry | None = None
_last_text: str = ""
_last_count = 0


def parse_registry(text: str, path: str, previous: FileRegistry | None = None) -> FileRegistry:
    """Parse the registry YAML; every problem is a SourceError naming the line.

    ``previous`` (the version in force) lets the fast reader re-read only the devices whose text
    changed. The same text at the same path gives the same (immutable) registry without reading it
    again: ``mqtt-pdp broker`` validates the files before the broker starts and the plugin then loads them.
    """
    global _last, _last_text, _last_count
    last = _last
    # Not if it has been released meanwhile (``FileRegistry.releasing`` empties a replaced version in place):
    # an outside attack saw a reverted file parsed as that emptied version, "no devices", and rejected.
    if last is not None and last.path == path and _last_text == text and len(last.devices) == _last_count:
        return last
    try:
        registry = _parse_simple(text, path, previous.chunks if previous is not None else {})
    except _NotSimple:
        log.debug("%s: outside the fast reader's subset; reading it as YAML", path)
        registry = _parse_yaml(text, path)
    _last, _last_text, _last_count = registry, text, len(registry.devices)
    return registry


def load_registry(path: str | Path) -> FileRegistry:
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SourceError(path, None, f"cannot read registry: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SourceError(path, None, "registry is not UTF-8 text") from None
    return parse_registry(text, path)
