"""The UI's files on disk: the workspace layout, uploads into a dataset, and caption editing.

Workspace layout (``--workspace DIR``, default ``./workspace``)::

    datasets/<name>/<N>_<concept>/   uploaded images and their caption files (kohya layout: N repeats)
    outputs/                         output.dir of runs started from the UI (always inside this folder)
    presets/<name>.toml              presets saved from the UI
    models/<name>/                   captioning models the Dataset tab may load (besides hub ids)
    jobs/<id>/                       one folder per training job (config.toml, job.json, worker.log, exit.json)
    thumbnails/                      small JPEGs the dataset gallery shows (a cache; safe to delete)
    last_config.toml                 the settings of the last Start or Save, shown again when the page loads

The web UI is a server, and every path a browser sends is a claim to be checked (:class:`Workspace`): dataset
folders resolve (links followed, ``..`` collapsed) into ``datasets/`` or a folder the operator named with
``python app.py --data-dir DIR``; output folders resolve into ``outputs/``; an image to caption or delete must lie in
the dataset opened, and the caption extension is one of :data:`CAPTION_EXTENSIONS`. Only ``outputs/`` and
``thumbnails/`` are ever served over HTTP (:attr:`Workspace.served`).

Uploads never escape their folder and never overwrite: a file name is reduced to its last component, stripped of
unsafe characters, and given a ``-1``, ``-2``… suffix when an image with the same stem (caption files are
per stem) already exists. Every image is decoded completely before it is kept (the trainer's own
:func:`trainer.dataset.inspect_image`); a file that cannot be trained on is reported with the reason and left out.
Zip files are streamed member by member to disk in chunks (never ``extractall``, never a whole member in memory),
with limits on the member count, each member's size, the total uncompressed size and the compression ratio of the
archive and of every member (zip bombs). A member that breaks a rule is skipped and named in the report; what was
unpacked before it is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import stat
import unicodedata
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from methods.files import write_text_atomic
from trainer.dataset import (
    IMAGE_EXTENSIONS,
    UnusableImage,
    inspect_image,
    is_image_name,
    parse_folder_name,
    training_images,
)
from trainer.dataset import read_caption as read_trainer_caption

CAPTION_EXTENSION = ".txt"
CAPTION_EXTENSIONS = (".txt", ".caption", ".tags")  # the only sidecars the UI reads or writes
MAX_NAME_LENGTH = 100
MAX_PIXELS = 40_000_000  # as dataset.max_pixels' default
MAX_FILE_BYTES = 200 * 2**20  # one uploaded image or caption, also inside a zip
MAX_ZIP_MEMBERS = 5_000
MAX_ZIP_TOTAL_BYTES = 2 * 2**30  # uncompressed, all members together
MAX_ZIP_RATIO = 100  # uncompressed / compressed, for the whole archive and for every member (zip-bomb guard)
RATIO_FLOOR_BYTES = 4096  # a member is compared with at least this many compressed bytes (tiny files compress oddly)
ARCHIVE_RATIO_FLOOR_BYTES = 2**20  # likewise for the whole archive
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # bzip2/lzma inflate without an output bound per read
CHUNK_BYTES = 2**20
MAX_CAPTION_BYTES = 64 * 1024
MAX_LISTED = 20  # rejected files listed one by one in an upload report
LINKED_OUT = "a link to a file outside this dataset folder: not shown or edited here (the trainer still reads it)"
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


class WorkspaceError(ValueError):
    """A user mistake with files or folders; the message says what to do."""


# ----- workspace ---------------------------------------------------------------------------------------------
class Workspace:
    """The folders the UI reads, writes and serves; ``data_dirs`` are extra dataset folders the operator allows
    (``python app.py --data-dir DIR``), never something a browser can set."""

    def __init__(self, root: str | os.PathLike, data_dirs: Iterable[str | os.PathLike] = ()):
        self.root = Path(root).expanduser().resolve()
        for folder in (self.datasets, self.outputs, self.presets, self.jobs):
            folder.mkdir(parents=True, exist_ok=True)
        self.data_dirs: tuple[Path, ...] = ()
        for folder in data_dirs:
            path = Path(folder).expanduser().resolve()
            if not path.is_dir():
                raise WorkspaceError(f"--data-dir {folder}: no such folder")
            self.data_dirs += (path,)

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def presets(self) -> Path:
        return self.root / "presets"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def thumbnails(self) -> Path:
        return self.root / "thumbnails"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def last_config(self) -> Path:
        return self.root / "last_config.toml"

    @property
    def dataset_roots(self) -> tuple[Path, ...]:
        return (self.datasets, *self.data_dirs)

    @property
    def served(self) -> tuple[Path, ...]:
        """The only folders whose files the web server may send: what runs wrote, and the gallery's thumbnails."""
        return self.outputs, self.thumbnails

    def default_dataset(self) -> Path:
        return self.datasets / "my_dataset"

    def dataset_folder(self, text: str | os.PathLike) -> Path:
        """The dataset folder a browser named, resolved: a relative name lies in ``datasets/``; the folder (links
        followed, ``..`` collapsed) must lie in ``datasets/`` or a ``--data-dir``, else WorkspaceError."""
        allowed = ", ".join(str(root) for root in self.dataset_roots)
        return confined(text, self.datasets, self.dataset_roots, "give a dataset folder",
                        f"the web UI opens datasets only in {allowed}. Type a name such as `my_dataset` (for "
                        f"{self.datasets / 'my_dataset'}) and upload the images there, or restart the server with "
                        "`python app.py --data-dir FOLDER` to work on a folder elsewhere.")

    def output_folder(self, text: str | os.PathLike) -> Path:
        """The output folder a browser named, resolved into ``outputs/`` (a relative name lies there)."""
        return confined(
            text, self.outputs, [self.outputs], "give an output folder",
            f"runs started from the web UI write into {self.outputs} (the only place the UI serves files from). "
            f"Type a folder name such as `my_run` (for {self.outputs / 'my_run'}), or train from a shell "
            "(`python -m trainer train`) to write elsewhere.", label="output.dir ")

    def output_file(self, text: str | os.PathLike) -> Path:
        """An existing file a browser named that a run of this workspace wrote (inside ``outputs/``)."""
        refusal = f"not a file in {self.outputs}; choose one from the list"
        path = confined(text, self.outputs, [self.outputs], "choose a file", refusal)
        if not path.is_file():
            raise WorkspaceError(f"{str(text).strip()}: {refusal}")
        return path

    def captioner(self, text: str) -> str:
        """A captioning model a browser named: a folder inside the workspace (a name is taken in ``models/``),
        or a hub id (``owner/name``) that names no folder on the server; WorkspaceError otherwise."""
        shown = str(text or "").strip()
        if not shown:
            raise WorkspaceError("give a captioning model: a hub id such as Salesforce/blip-image-captioning-base, "
                                 f"or the name of a model folder in {self.models}")
        path = Path(shown).expanduser()
        local = (path if path.is_absolute() else self.models / path).resolve()
        if local.is_dir() and is_within(local, self.root):
            return str(local)
        hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", shown) and ".." not in shown
        if hub_id and not path.exists():  # the captioner would take a folder of that name as the model
            return shown
        raise WorkspaceError(f"{shown}: the web UI loads captioning models only from {self.models} (put the model "
                             "folder there and give its name) or by hub id (owner/name)")

    def is_served(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` (links followed) lies in a folder the web server may send files from."""
        resolved = Path(path).expanduser().resolve()
        return any(is_within(resolved, folder) for folder in self.served)


def confined(text: str | os.PathLike, base: Path, roots: Iterable[Path], missing: str, refusal: str,
             label: str = "") -> Path:
    """A path a browser sent, resolved (relative to ``base``, links followed, ``..`` collapsed), if it lies in one
    of ``roots``; else WorkspaceError ``"<label><text>: <refusal>"`` (``missing`` when it is empty)."""
    shown = str(text or "").strip()
    if not shown:
        raise WorkspaceError(missing)
    path = Path(shown).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    if not any(is_within(path, root) for root in roots):
        raise WorkspaceError(f"{label}{shown}: {refusal}")
    return path


def is_within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or below it (both taken as they are: resolve them first)."""
    return path == folder or folder in path.parents


# ----- names -------------------------------------------------------------------------------------------------
def sanitize_name(name: str, fallback: str = "file") -> str:
    """A safe file name from an uploaded name: last path component only, no control or shell-special characters,
    no leading dots (hidden files), not a Windows device name, at most ``MAX_NAME_LENGTH`` characters."""
    name = unicodedata.normalize("NFKC", str(name)).replace("\\", "/").split("/")[-1]
    name = "".join(c if (c.isalnum() or c in "-_. ") else "_" for c in name)
    name = re.sub(r"\s+", " ", name).strip(" .")
    name = re.sub(r"_+", "_", name)
    stem, suffix = os.path.splitext(name)
    suffix = suffix.lower() if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix.lower()) else ""
    stem = stem.strip(" ._") or fallback
    if stem.lower() in _RESERVED:
        stem = "_" + stem
    stem = stem[: MAX_NAME_LENGTH - len(suffix)]
    return stem + suffix


def sanitize_folder_name(name: str) -> str:
    """A concept or dataset folder name (no path separators, not hidden); raises when nothing usable is left."""
    cleaned = sanitize_name(name, fallback="")
    cleaned = cleaned.replace(".", "_").strip(" _")
    if not cleaned:
        raise WorkspaceError(f"{name!r} is not usable as a folder name; use letters, digits, '-' or '_'")
    return cleaned


def unique_image_path(folder: Path, name: str) -> Path:
    """``folder/name``, or ``stem-1.ext``, ``stem-2.ext``… when an image (any extension) or a caption already
    uses the stem: images and captions pair up by stem, so a new image must not adopt another one's caption."""
    stem, suffix = os.path.splitext(name)
    taken = {p.stem.lower() for p in folder.iterdir()} if folder.is_dir() else set()
    candidate, index = stem, 1
    while candidate.lower() in taken:
        candidate = f"{stem}-{index}"
        index += 1
    return folder / (candidate + suffix)


def is_inside(path: Path, folder: Path) -> bool:
    return is_within(path.resolve(), folder.resolve())


# ----- uploads -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class UploadReport:
    added: list[Path] = dataclasses.field(default_factory=list)
    captions: list[Path] = dataclasses.field(default_factory=list)  # caption files written
    renamed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (uploaded name, stored name)
    rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (uploaded name, reason)

    def summary(self) -> str:
        lines = [f"{len(self.added)} image(s) added" + (f", {len(self.captions)} caption(s) written"
                                                         if self.captions else "")]
        lines += [f"renamed {old} → {new} (the name was taken or unsafe)" for old, new in self.renamed]
        lines += [f"left out {name}: {reason}" for name, reason in self.rejected[:MAX_LISTED]]
        if len(self.rejected) > MAX_LISTED:
            lines.append(f"… and {len(self.rejected) - MAX_LISTED} more file(s) left out")
        return "\n".join(lines)


@dataclasses.dataclass
class _Incoming:
    """One uploaded file: its original name (with any folder inside a zip) and where its bytes are on disk;
    ``staged`` files were unpacked by us (into the target's staging folder) and may be moved or deleted."""

    name: str
    path: Path
    staged: bool = False


def concept_folder(dataset_dir: Path, concept: str, repeats: int) -> Path:
    """The folder for ``concept``: an existing ``N_concept`` (any N) or a new ``<repeats>_concept``."""
    concept = sanitize_folder_name(concept)
    if dataset_dir.is_dir():
        for folder in sorted(p for p in dataset_dir.iterdir() if p.is_dir()):
            if parse_folder_name(folder.name)[1] == concept:
                return folder
    return dataset_dir / f"{max(1, int(repeats))}_{concept}"


def add_uploads(paths: Iterable[str | os.PathLike], target: Path, max_pixels: int = MAX_PIXELS) -> UploadReport:
    """Copy uploaded images, caption files and ``.zip`` archives of them into ``target``."""
    report = UploadReport()
    target.mkdir(parents=True, exist_ok=True)
    with _staging(target) as stage:
        captions: list[_Incoming] = []
        stems: dict[tuple[str, str], str] = {}  # (folder inside the upload, uploaded stem) → stored stem
        for raw in paths:
            path = Path(raw)
            if path.suffix.lower() == ".zip":
                members = unpack_zip(path, stage, report)
            else:
                members = iter([_Incoming(path.name, path)])
            for item in members:  # each image is stored as soon as it is unpacked: later failures never lose it
                if item.name.lower().endswith(CAPTION_EXTENSION):
                    captions.append(item)
                else:
                    store_image(item, target, report, stems, max_pixels)
        for item in captions:
            store_caption(item, target, report, stems)
    return report


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A hidden folder in ``target`` (the same file system: stored files are hard links) removed afterwards."""
    stage = target / f".upload-{secrets.token_hex(6)}"
    stage.mkdir()
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _ratio_too_high(unpacked: int, packed: int, floor: int) -> bool:
    return unpacked > MAX_ZIP_RATIO * max(packed, floor)


def unpack_zip(path: Path, stage: Path, report: UploadReport) -> Iterator[_Incoming]:
    """Stream the archive's usable members into ``stage`` one at a time, in chunks. An archive that is not a zip,
    has too many members, unpacks too large or compresses too well as a whole is refused before anything is
    written; a member that breaks a rule (link, encryption, method, size, ratio) is skipped with the reason."""
    shown = path.name
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        report.rejected.append((shown, f"not a readable zip archive ({error})"))
        return
    with archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        total = sum(info.file_size for info in infos)
        if len(infos) > MAX_ZIP_MEMBERS:
            report.rejected.append((shown, f"too many files in the archive ({len(infos)} > {MAX_ZIP_MEMBERS})"))
            return
        if total > MAX_ZIP_TOTAL_BYTES:
            report.rejected.append((shown, f"the archive unpacks to {total / 2**30:.1f} GiB, more than the "
                                           f"{MAX_ZIP_TOTAL_BYTES / 2**30:.0f} GiB allowed"))
            return
        size = path.stat().st_size
        if _ratio_too_high(total, size, ARCHIVE_RATIO_FLOOR_BYTES):
            report.rejected.append((shown, f"the archive unpacks to {total / 2**20:.0f} MiB from "
                                           f"{size / 2**20:.1f} MiB, a ratio above {MAX_ZIP_RATIO}:1 (zip bomb?); "
                                           "nothing was unpacked"))
            return
        unpacked = 0
        for info in infos:
            parts = info.filename.replace("\\", "/").split("/")
            name = "/".join(parts)
            if any(part.startswith(".") and part not in (".", "..") or part == "__MACOSX" for part in parts):
                continue  # hidden files and macOS resource forks
            reason = _member_problem(info)
            if reason is None and unpacked + info.file_size > MAX_ZIP_TOTAL_BYTES:
                reason = "not unpacked: the archive's total size limit was reached"
            if reason is not None:
                report.rejected.append((name, reason))
                continue
            staged = stage / f"{secrets.token_hex(8)}{os.path.splitext(parts[-1])[1].lower()[:9]}"
            try:
                written = _copy_member(archive, info, staged)
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError, ValueError) as error:
                staged.unlink(missing_ok=True)
                report.rejected.append((name, f"cannot be unpacked ({error})"))
                continue
            unpacked += written
            yield _Incoming(name, staged, staged=True)


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a member is not unpacked (from its header: zipfile never returns more than the declared size)."""
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic links are not allowed in an archive"
    if info.flag_bits & 0x1:
        return "encrypted files are not supported"
    if info.compress_type not in ZIP_METHODS:
        return "compressed with a method other than deflate or store (re-create the zip with a common tool)"
    if info.file_size > MAX_FILE_BYTES:
        return f"file too large ({info.file_size / 2**20:.0f} MiB > {MAX_FILE_BYTES // 2**20} MiB)"
    if _ratio_too_high(info.file_size, info.compress_size, RATIO_FLOOR_BYTES):
        return (f"unpacks to {info.file_size:,} bytes from {info.compress_size:,}, a compression ratio above "
                f"{MAX_ZIP_RATIO}:1 (zip bomb?)")
    return None


def _copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> int:
    """Write one member to ``path`` in chunks; returns the bytes written (at most the declared, checked size)."""
    written = 0
    with archive.open(info) as source, path.open("xb") as sink:  # zipfile checks the CRC at the end
        while chunk := source.read(CHUNK_BYTES):
            written += len(chunk)
            if written > min(info.file_size, MAX_FILE_BYTES):
                raise ValueError("more data than the archive declares")
            sink.write(chunk)
    return written


def store_image(item: _Incoming, target: Path, report: UploadReport, stems: dict[tuple[str, str], str],
                max_pixels: int = MAX_PIXELS) -> Path | None:
    """Keep one uploaded image under a fresh, safe name in ``target`` after decoding it completely."""
    folder, _, base = item.name.rpartition("/")
    if not is_image_name(base.lstrip(".")):
        report.rejected.append((item.name, f"not an image or caption file (accepted: {', '.join(IMAGE_EXTENSIONS)}"
                                           f", {CAPTION_EXTENSION}, .zip)"))
        return None
    name = sanitize_name(base, fallback="image")
    if not is_image_name(name):  # the extension did not survive sanitizing
        name = os.path.splitext(name)[0] + ".png"
    path = write_new_image(item, target, name, max_pixels, report)
    if path is not None:
        stems[(folder, os.path.splitext(base)[0])] = path.stem
    return path


def store_caption(item: _Incoming, target: Path, report: UploadReport, stems: dict[tuple[str, str], str]) -> None:
    """Write an uploaded caption beside the image it belongs to (the one stored from the same upload, else an
    existing image of the same stem)."""
    folder, _, base = item.name.rpartition("/")
    stem = os.path.splitext(base)[0]
    stored = stems.get((folder, stem))
    if stored is None:
        existing = [p for p in target.iterdir() if p.stem == sanitize_name(stem) and is_image_name(p.name)]
        if not existing:
            report.rejected.append((item.name, "caption file without an image of the same name"))
            return
        stored = existing[0].stem
    try:
        text = decode_caption(_read_limited(item.path, MAX_CAPTION_BYTES))
    except WorkspaceError as error:
        report.rejected.append((item.name, str(error)))
        return
    except OSError as error:
        report.rejected.append((item.name, f"cannot read the upload ({error.strerror or error})"))
        return
    caption_path = target / (stored + CAPTION_EXTENSION)
    write_text_atomic(caption_path, text_file(text))
    report.captions.append(caption_path)


def _read_limited(path: Path, limit: int) -> bytes:
    with path.open("rb") as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise WorkspaceError(f"caption file too large (more than {limit} bytes)")
    return data


def write_new_image(item: _Incoming, target: Path, name: str, max_pixels: int, report: UploadReport) -> Path | None:
    """Decode the upload completely, then link it into ``target`` under a name no file uses; None (and a reason in
    the report) if it is unusable."""
    shown = item.name
    try:
        size = item.path.stat().st_size
    except OSError as error:
        report.rejected.append((shown, f"cannot read the upload ({error.strerror or error})"))
        return None
    if not size:
        report.rejected.append((shown, "empty file (0 bytes)"))
        return None
    if size > MAX_FILE_BYTES:
        report.rejected.append((shown, f"file too large ({size / 2**20:.0f} MiB > {MAX_FILE_BYTES // 2**20} MiB)"))
        return None
    if item.staged:
        temporary = item.path
    else:  # an upload of the web server's: copy it (in chunks) beside its final place
        temporary = target / f".upload-{secrets.token_hex(6)}{os.path.splitext(name)[1]}"
        shutil.copyfile(item.path, temporary)
    try:
        try:
            inspect_image(temporary, max_pixels)
        except UnusableImage as error:
            report.rejected.append((shown, str(error)))
            return None
        for _ in range(1000):
            path = unique_image_path(target, name)
            try:
                os.link(temporary, path)  # fails if the name appeared meanwhile: never overwrites
            except FileExistsError:
                continue
            except OSError:  # no hard links on this file system
                if path.exists():
                    continue
                shutil.copyfile(temporary, path)
            if path.name != os.path.basename(shown):
                report.renamed.append((shown, path.name))
            report.added.append(path)
            return path
        report.rejected.append((shown, "no free file name"))
        return None
    finally:
        temporary.unlink(missing_ok=True)


def decode_caption(data: bytes) -> str:
    if len(data) > MAX_CAPTION_BYTES:
        raise WorkspaceError(f"caption file too large ({len(data)} bytes > {MAX_CAPTION_BYTES})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise WorkspaceError(f"caption file is not UTF-8 text ({error.reason} at byte {error.start})") from None
    return clean_caption(text)


def clean_caption(text: str) -> str:
    """Captions are one line (the trainer reads the first non-blank line): join lines, trim spaces."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def text_file(text: str) -> str:
    """A text file's content: the text and a final newline (nothing at all for no text)."""
    return text + "\n" if text else ""


# ----- datasets ----------------------------------------------------------------------------------------------
# The folder rules (N_name repeats, image extensions, loss masks, caption sidecars) are the trainer's own
# (trainer.dataset); here they are only applied to what a browser may see and change.
@dataclasses.dataclass
class DatasetImage:
    path: Path
    folder: str  # concept folder name ("10_subject"), "" for images directly in the dataset folder
    caption: str
    linked_out: bool = False  # a link to a file outside the dataset folder: neither shown nor edited


@dataclasses.dataclass
class Concept:
    folder: str
    name: str
    repeats: int
    images: int


def _image_files(folder: Path) -> list[Path]:
    return training_images(sorted(p for p in folder.iterdir() if p.is_file()))


def _readable_files(folder: Path) -> dict[str, Path]:
    """The folder's files by lower-cased name (the trainer's caption look-up), links out of it left out."""
    files: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not _linked_out(p, folder)):
        files.setdefault(path.name.lower(), path)
    return files


def concept_folders(dataset_dir: Path) -> list[Path]:
    """The dataset folder itself and its immediate visible sub-folders (what the trainer reads)."""
    if not dataset_dir.is_dir():
        raise WorkspaceError(f"{dataset_dir}: no such folder")
    return [dataset_dir] + sorted(p for p in dataset_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(dataset_dir: Path, extension: str = CAPTION_EXTENSION) -> list[DatasetImage]:
    extension = caption_extension(extension)
    root = dataset_dir.resolve()
    images = []
    for folder in concept_folders(dataset_dir):
        name = "" if folder == dataset_dir else folder.name
        files = _readable_files(folder)
        for path in _image_files(folder):
            if is_within(path.resolve(), root):
                images.append(DatasetImage(path, name, read_caption(path, extension, files)))
            else:
                images.append(DatasetImage(path, name, "", linked_out=True))
    return images


def list_concepts(dataset_dir: Path) -> list[Concept]:
    concepts = []
    for folder in concept_folders(dataset_dir)[1:]:
        repeats, name = parse_folder_name(folder.name)
        concepts.append(Concept(folder.name, name, repeats, len(_image_files(folder))))
    return concepts


def caption_extension(extension: str) -> str:
    """The caption extension a browser sent, if it is one of :data:`CAPTION_EXTENSIONS` (any letter case)."""
    normalized = str(extension or "").strip().lower()
    if normalized not in CAPTION_EXTENSIONS:
        raise WorkspaceError(f"caption extension {extension!r}: the web UI reads and writes only "
                             f"{', '.join(CAPTION_EXTENSIONS)} caption files; choose one of them")
    return normalized


def caption_path(image: Path, extension: str = CAPTION_EXTENSION) -> Path:
    return image.with_suffix(caption_extension(extension))


def _linked_out(path: Path, folder: Path) -> bool:
    """A link (or a file behind a linked folder) whose target is outside ``folder``."""
    return path.is_symlink() and not is_within(path.resolve(), folder.resolve())


def _trainer_caption(image: Path, extension: str, files: dict[str, Path] | None = None) -> str | None:
    """The trainer's caption of ``image`` (:func:`trainer.dataset.read_caption`, UnusableImage for an unreadable
    file), never read through a link out of the image's folder. ``files``: :func:`_readable_files` of it."""
    exact = image.with_suffix(extension)
    if _linked_out(exact, image.parent):
        return None
    if files is None:  # only an image without its exact sidecar needs the folder's other names
        files = {} if exact.is_file() else _readable_files(image.parent)
    return read_trainer_caption(image, extension, files)[0]


def read_caption(image: Path, extension: str = CAPTION_EXTENSION, files: dict[str, Path] | None = None) -> str:
    """The caption the trainer would read for ``image``: "" for none or an unreadable one."""
    try:
        return _trainer_caption(image, caption_extension(extension), files) or ""
    except UnusableImage:
        return ""


def check_image(dataset_dir: Path, image: str | os.PathLike) -> Path:
    """``image`` (sent back by the browser: never trusted) as an image file of the dataset, without ``..``, and
    inside the dataset also with links followed. Returns the path as named (a link stays a link)."""
    text = str(image).strip()
    path = Path(text).expanduser()
    path = path if path.is_absolute() else dataset_dir / path
    root = dataset_dir.resolve()
    if not text or ".." in path.parts or not is_within(path, dataset_dir) or not is_within(path.resolve(), root) \
            or not path.is_file() or not is_image_name(path.name):
        raise WorkspaceError(f"{image}: not an image of the dataset {dataset_dir}; select an image in the gallery")
    return path


def writable_caption(image: Path, extension: str) -> Path:
    """The caption file of a checked image, unless it is a link (the UI never writes through a link)."""
    path = caption_path(image, extension)
    if path.is_symlink():
        raise WorkspaceError(f"{path.name} is a link; the web UI does not write through links (edit the file it "
                             "points to directly)")
    return path


def write_caption(dataset_dir: Path, image: str | os.PathLike, text: str, extension: str = CAPTION_EXTENSION) -> Path:
    path = writable_caption(check_image(dataset_dir, image), extension)
    write_text_atomic(path, text_file(clean_caption(text)))
    return path


def _rewrite_captions(dataset_dir: Path, change, extension: str) -> int:
    changed = 0
    for item in list_images(dataset_dir, extension):
        path = caption_path(item.path, extension)
        if item.linked_out or path.is_symlink():
            continue
        new = clean_caption(change(item.caption))
        if new != item.caption:
            write_text_atomic(path, text_file(new))
            changed += 1
    return changed


def add_trigger_word(dataset_dir: Path, word: str, extension: str = CAPTION_EXTENSION) -> int:
    """Put ``word`` first in every caption that does not contain it yet (as a whole word); returns the count."""
    word = clean_caption(word).strip(" ,")
    if not word:
        raise WorkspaceError("type the trigger word first")
    pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)

    def change(caption: str) -> str:
        if pattern.search(caption):
            return caption
        return f"{word}, {caption}" if caption else word

    return _rewrite_captions(dataset_dir, change, extension)


def find_replace(dataset_dir: Path, find: str, replace: str, extension: str = CAPTION_EXTENSION) -> int:
    """Replace every occurrence of ``find`` (plain text) in every caption; returns the number of files changed."""
    if not find:
        raise WorkspaceError("type the text to find first")
    return _rewrite_captions(dataset_dir, lambda caption: caption.replace(find, replace), extension)


def set_repeats(dataset_dir: Path, folder: str, repeats: int) -> Path:
    """Rename the concept folder to ``<repeats>_<name>`` (kohya's repeat count); returns the new folder."""
    repeats = int(repeats)
    if repeats < 1:
        raise WorkspaceError(f"repeats must be ≥ 1, got {repeats}")
    source = dataset_dir / folder
    if not folder or "/" in folder or folder.startswith(".") or not source.is_dir():
        raise WorkspaceError("images directly in the dataset folder count once; upload into a concept (sub-folder) "
                             "to set repeats" if not folder else f"{folder}: not a concept folder of {dataset_dir}")
    name = parse_folder_name(source.name)[1]
    target = dataset_dir / f"{repeats}_{name}"
    if target == source:
        return target
    if target.exists():
        raise WorkspaceError(f"{target.name} already exists")
    source.rename(target)
    return target


def delete_image(dataset_dir: Path, image: str | os.PathLike, extension: str = CAPTION_EXTENSION) -> None:
    path = check_image(dataset_dir, image)
    caption_path(path, extension).unlink(missing_ok=True)  # a link is removed, never what it points to
    path.unlink()


def image_problem(image: Path, extension: str = CAPTION_EXTENSION, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why the trainer would skip ``image`` (its own decode and caption checks), or None."""
    try:
        inspect_image(image, max_pixels)
        _trainer_caption(image, caption_extension(extension))
    except UnusableImage as reason:
        return str(reason)
    return None


class ImageChecker:
    """:func:`image_problem` remembered per (file, size, modification time): a refresh only decodes new files."""

    def __init__(self) -> None:
        self._known: dict[tuple, str | None] = {}

    def problems(self, images: list[Path], extension: str = CAPTION_EXTENSION,
                 max_pixels: int = MAX_PIXELS) -> list[tuple[Path, str]]:
        found = []
        for image in images:
            try:
                info = image.stat()
                caption = caption_path(image, extension)
                caption_time = caption.stat().st_mtime_ns if caption.is_file() else 0
            except OSError as error:
                found.append((image, f"cannot read the file ({error.strerror or error})"))
                continue
            key = (str(image), info.st_size, info.st_mtime_ns, caption_time, extension, max_pixels)
            if key not in self._known:
                self._known[key] = image_problem(image, extension, max_pixels)
            if self._known[key] is not None:
                found.append((image, self._known[key]))
        return found


def thumbnail(image: Path, cache_dir: Path, size: int = 256) -> Path:
    """A small JPEG of ``image`` (upright, RGB), cached by path, size and modification time: the gallery shows
    these, so a refresh sends kilobytes instead of every full-size image."""
    import hashlib

    from trainer.dataset import load_image

    info = image.stat()
    key = hashlib.sha1(f"{image.resolve()}|{info.st_size}|{info.st_mtime_ns}|{size}".encode()).hexdigest()
    path = cache_dir / key[:2] / f"{key}.jpg"
    if path.is_file():
        return path
    rgb, _ = load_image(image)
    rgb.thumbnail((size, size))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    rgb.save(temporary, "JPEG", quality=88)
    os.replace(temporary, path)
    return path
