"""What a generated PNG records about how it was made, and `showo info`.

Every image showo-mlx writes carries PNG text chunks:

* `Software` and `Comment`, keywords of the PNG specification (section 11.3.4.2) that image viewers
  show: the program and version, and one human-readable line (task, prompt, seed, settings, model);
* `showo-mlx`: a JSON object of every setting (`record`), enough to run it again
  (`showo generate --config-from-metadata IMAGE.png`);
* the main settings as plain keys too (`prompt`, `seed`, `steps`, `guidance`, `temperature`,
  `schedule`, `task`, `model`, …) for tools that read single keys.

Nothing in the record depends on the time, the output path or the machine, so the same settings
write the same bytes: a greedy run repeated from its metadata reproduces its PNG exactly.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from .errors import ImageInputError

KEY = "showo-mlx"  # the JSON block's PNG keyword
FORMAT = 1
FLAT_KEYS = ("prompt", "seed", "steps", "guidance", "temperature", "schedule", "task", "model")
_NOT_EXTRA = set(FLAT_KEYS) | {"format", "software", "greedy", "dtype", "quantize", "width", "height"}


def comment(record: Mapping[str, Any]) -> str:
    """One line a person can read: `generate "a red cat", seed 3, 18 steps, guidance 1.75, …`."""
    seed = "greedy (argmax, no noise)" if record.get("greedy") else f"seed {record.get('seed')}"
    parts = [
        f"{record.get('task')} {json.dumps(record.get('prompt'), ensure_ascii=False)}",
        seed,
        f"{record.get('steps')} steps",
        f"guidance {record.get('guidance')}",
        f"temperature {record.get('temperature')}",
        f"{record.get('schedule')} schedule",
        f"{record.get('width')}x{record.get('height')}",
        f"model {record.get('model')}",
    ]
    if record.get("dtype"):
        parts.append(str(record["dtype"]))
    if record.get("quantize"):
        parts.append(f"{record['quantize'].get('bits')}-bit")
    return ", ".join(parts)


def png_text(record: Mapping[str, Any]) -> dict[str, str]:
    """The PNG text chunks for `record` (see the module docstring)."""
    flat = {k: ("greedy" if k == "seed" and record.get("greedy") else record.get(k)) for k in FLAT_KEYS}
    flat.update({k: v for k, v in record.items() if k not in _NOT_EXTRA})
    chunks = {"Software": str(record.get("software", "")), "Comment": comment(record),
              KEY: json.dumps(record, sort_keys=True, ensure_ascii=False)}
    chunks.update({k: str(v) for k, v in flat.items() if v is not None})
    return chunks


def read_text(path: str | os.PathLike) -> dict[str, str]:
    """Every text chunk of a PNG (ImageInputError when it is not a readable image)."""
    from .images import read_png_metadata

    return read_png_metadata(path)


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The settings a showo-mlx PNG records (ImageInputError when there are none)."""
    text = read_text(path)
    if KEY not in text:
        raise ImageInputError(f"{path} has no showo-mlx settings (it was not written by showo-mlx {FORMAT}.x or was re-saved)")
    try:
        record = json.loads(text[KEY])
    except json.JSONDecodeError as e:
        raise ImageInputError(f"{path}: its showo-mlx settings are not valid JSON ({e.msg}); the file was edited") from None
    if not isinstance(record, dict):
        raise ImageInputError(f"{path}: its showo-mlx settings are not a JSON object; the file was edited")
    if record.get("format", 0) > FORMAT:
        raise ImageInputError(f"{path} was written by a newer showo-mlx (metadata format {record['format']}); upgrade showo-mlx")
    return record


def describe(text: Mapping[str, str]) -> list[str]:
    """`key: value` lines: Software and Comment first, then the settings record (or, for a PNG
    from another program, its text chunks)."""
    lines = [f"{k}: {text[k]}" for k in ("Software", "Comment") if k in text]
    try:
        record = json.loads(text[KEY]) if KEY in text else None
    except json.JSONDecodeError:
        record = None  # an edited file: show its chunks as they are
    if isinstance(record, dict):
        lines += [f"{k}: {json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v}"
                  for k, v in record.items()]
    else:
        lines += [f"{k}: {v}" for k, v in text.items() if k not in ("Software", "Comment")]
    return lines


def register(app) -> None:
    """Add `showo info` to a typer app."""
    import typer

    from .cli_common import handle_errors

    @app.command(
        epilog="Examples:\n\n"
        "  showo info image.png\n\n"
        "  showo info image.png --json > settings.json\n\n"
        "  showo generate --config-from-metadata image.png --seed 7",
    )
    @handle_errors
    def info(
        image: str = typer.Argument(..., metavar="IMAGE", help="A PNG written by showo (generate, inpaint, extend)."),
        as_json: bool = typer.Option(False, "--json", help="Print only the settings record, as JSON; off by default."),
    ):
        """Print how IMAGE was made: software, model, prompt, seed and every setting."""
        if as_json:
            typer.echo(json.dumps(read_record(image), indent=2, ensure_ascii=False))
            return
        text = read_text(image)
        if not text:
            raise ImageInputError(f"{image} carries no text metadata")
        for line in describe(text):
            typer.echo(line)
