"""Images: :class:`ImageWriter`, one file per row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from skybatch.batches import Part
from skybatch.errors import OutputError
from skybatch.io import storage
from skybatch.io.base import OutputWriter
from skybatch.io.formats.files import checked_path
from skybatch.runner import codec

__all__ = ["ImageWriter"]

_FORMATS = ("png", "jpeg", "webp")


class ImageWriter(OutputWriter):
    """Saves the PIL images of one result column as files in a directory.

    Each file is named by the row's global index, zero-padded to 8 digits
    (``00000042.png``), or by the value of the column ``name`` (a file stem).
    ``format`` is ``"png"`` (default), ``"jpeg"`` or ``"webp"``. The runner
    encodes each image (where PIL is, since the mapper made the image), the
    agent writes a batch's files concurrently. In every other output of the
    job, the image column holds the file's name relative to ``path``, so a
    ``JsonWriter`` manifest maps each row to its image.

    Files are staged beside the directory and moved into it when the job
    succeeds (renames locally; server-side copies on object stores).
    """

    kind = "image"
    part_format = codec.IMAGE
    part_ext = "d"
    # A part is a directory of files: the relay hands the packed part to write_part.
    part_is_file = False

    def __init__(
        self,
        path: str,
        column: str = "image",
        name: str | None = None,
        format: str = "png",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        path = checked_path("ImageWriter", path)
        if not isinstance(column, str) or not column:
            raise TypeError("ImageWriter(column=...): name the result column holding the images")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError("ImageWriter(name=...): name the column holding each file's stem")
        fmt = format.lower() if isinstance(format, str) else format
        fmt = "jpeg" if fmt == "jpg" else fmt
        if fmt not in _FORMATS:
            raise ValueError(f"ImageWriter(format={format!r}): use one of {', '.join(_FORMATS)}")
        self.path = storage.resolve(path).rstrip("/")
        self.column = column
        self.name = name
        self.format = fmt
        self.columns = [column]
        self.storage_options = storage_options

    def __repr__(self) -> str:
        extra = f", name={self.name!r}" if self.name else ""
        extra += f", format={self.format!r}" if self.format != "png" else ""
        return f"ImageWriter({self.path!r}, column={self.column!r}{extra})"

    def to_spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "column": self.column,
            "name": self.name,
            "format": self.format,
            "storage_options": self.storage_options,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ImageWriter:
        return cls(
            spec["path"],
            spec.get("column", "image"),
            spec.get("name"),
            spec.get("format", "png"),
            spec.get("storage_options"),
        )

    def runner_spec(self) -> dict[str, Any]:
        return {
            "format": codec.IMAGE,
            "column": self.column,
            "name": self.name,
            "image_format": self.format,
            "columns": None,
        }

    def prepare(self, job_id: int, overwrite: bool) -> None:
        self.prepare_directory(job_id, overwrite)

    def output_exists(self) -> bool:
        return self.directory_has_files()

    def write_part(self, job_id: int, batch: int, attempt: int, data: bytes) -> int | None:
        part = self.part_path(job_id, batch, attempt)
        files = {storage.join(part, name): blob for name, blob in codec.unpack_files(data)}
        fs, _ = storage.filesystem(part, self.storage_options)
        with storage.translate_errors(part, "write images to", OutputError):
            if storage.is_local(part):
                storage.makedirs(part, self.storage_options)
                for url, blob in files.items():
                    with open(url, "wb") as f:
                        f.write(blob)
            else:
                # One call: fsspec's async backends send the files concurrently.
                fs.pipe(
                    {storage.filesystem(u, self.storage_options)[1]: b for u, b in files.items()}
                )
        return None  # a directory of files: not checked by size

    def discard_part(self, job_id: int, batch: int, attempt: int) -> None:
        storage.remove_tree(self.part_path(job_id, batch, attempt), self.storage_options)

    def stage(self, job_id: int | str, parts: Sequence[Part]) -> storage.Staged:
        moves: list[tuple[str, str]] = []
        owner: dict[str, int] = {}
        for part in parts:
            url = self.part_path(job_id, part.batch, part.attempt)
            fs, path = storage.filesystem(url, self.storage_options)
            with storage.translate_errors(url, "list images in", OutputError):
                names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
            for name in names:
                if name in owner:
                    raise OutputError(
                        f"{self.path}: two rows (in rows {owner[name]}- and {part.row_start}-) "
                        f"want the file name {name!r}; the ImageWriter's name= column must be "
                        "unique"
                    )
                owner[name] = part.row_start
                moves.append((storage.join(url, name), storage.join(self.path, name)))
        return storage.StagedMoves(self.path, moves, self.storage_options)
