"""A registry file changed one device at a time, keeping everything else as the people who edit it wrote it.

Pure text in, text out: ``with_device`` replaces the lines of one device (or appends
a new one) and leaves every other line, comments included, byte for byte. The result
is parsed again and compared with what was meant; where the file's layout does not
allow a local edit (flow style, several devices on a line), the whole file is
written in the canonical layout instead, and the caller is told so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from pdp.registry.device import Device
from pdp.registry.file import FileRegistry, format_time, parse_registry

_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*")
_ITEM = re.compile(r"( *)- ")


def _scalar(value: str) -> str:
    """Plain when YAML reads it back as the same string; JSON-quoted (valid YAML) otherwise."""
    if _PLAIN.fullmatch(value) and value.lower() not in ("null", "true", "false", "yes", "no", "on", "off", "~"):
        return value
    return json.dumps(value)


def render_device(device: Device, indent: int = 2) -> str:
    """One device as a block item at ``indent``, in the README's field order; ends with a newline."""
    pad = " " * (indent + 2)
    lines = [f"{' ' * indent}- id: {_scalar(device.device_id)}"]
    lines += [f"{pad}{name}: {_scalar(value)}" for name, value in
              (("type", device.type), ("location", device.location), ("purpose", device.purpose),
               ("owner", device.owner), ("status", device.status))]
    if device.gateway:
        lines.append(f"{pad}gateway: {_scalar(device.gateway)}")
    bound = {b.fingerprint for b in device.bindings}
    legacy = sorted(device.fingerprints - bound)
    if legacy:
        lines.append(f"{pad}fingerprints: [{', '.join(json.dumps(fp) for fp in legacy)}]")
    if device.bindings:
        lines.append(f"{pad}certificates:")
        for b in device.bindings:
            fields = [f"fingerprint: {json.dumps(b.fingerprint)}"]
            if b.serial:
                fields.append(f"serial: {json.dumps(b.serial)}")
            if b.issuer:
                fields.append(f"issuer: {json.dumps(b.issuer)}")
            if b.expires is not None:
                fields.append(f"expires: {json.dumps(format_time(b.expires))}")
            if b.not_after is not None:
                fields.append(f"not_after: {json.dumps(format_time(b.not_after))}")
            lines.append(f"{pad}  - {{{', '.join(fields)}}}")
    return "\n".join(lines) + "\n"


def render_registry(devices: Mapping[str, Device] | list[Device]) -> str:
    items = list(devices.values()) if isinstance(devices, Mapping) else devices
    return "devices:\n" + "".join(render_device(device) for device in items)


def _local_edit(text: str, registry: FileRegistry, device: Device) -> str | None:
    """The text with ``device`` replaced (or appended) in place; None when the layout does not allow it."""
    if not text.endswith("\n") or not registry.lines:
        return None
    lines = text.split("\n")[:-1]
    starts = sorted(registry.lines.values())
    if len(set(starts)) != len(starts):
        return None  # several devices on one line (flow style)
    first = _ITEM.match(lines[starts[0] - 1])
    if first is None:
        return None
    indent = len(first.group(1))
    for start in starts:
        match = _ITEM.match(lines[start - 1])
        if match is None or len(match.group(1)) != indent:
            return None
    block = render_device(device, indent).rstrip("\n").split("\n")
    start_line = registry.lines.get(device.device_id)
    if start_line is None:  # a new device: after the last one, before any trailing comment lines
        end = len(lines)
        while end > starts[-1] and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
            end -= 1
        return "\n".join(lines[:end] + block + lines[end:]) + "\n"
    begin = start_line - 1
    later = [s for s in starts if s > start_line]
    end = later[0] - 1 if later else len(lines)
    while end > begin + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1  # comments and blank lines between this device and the next stay where they are
    return "\n".join(lines[:begin] + block + lines[end:]) + "\n"


def with_device(text: str, registry: FileRegistry, device: Device) -> tuple[str, bool]:
    """The registry text with ``device`` added or replaced, and whether the file kept its layout.

    Every other device reads back exactly as before; if the local edit would not give that
    (a layout outside what it understands), the whole registry is written canonically.
    """
    expected = dict(registry.devices)
    expected[device.device_id] = device
    edited = _local_edit(text, registry, device)
    if edited is not None:
        try:
            if dict(parse_registry(edited, registry.path).devices) == expected:
                return edited, True
        except Exception:  # noqa: BLE001 - any failure means: fall back to the canonical layout
            pass
    return render_registry(expected), False
