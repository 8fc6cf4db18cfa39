"""The UI's files on disk: the workspace layout, uploads into a dataset, and caption editing.

Workspace layout (``--workspace DIR``, default ``./workspace``)::

    datasets/<name>/<N>_<concept>/   uploaded images and their caption files (kohya layout: N repeats)
    outputs/                         default output.dir of runs started from the UI
    presets/<name>.toml              presets saved from the UI
    jobs/<id>/                       one folder per training job (config.toml, job.json, worker.log, exit.json)
    thumbnails/                      small JPEGs the dataset gallery shows (a cache; safe to delete)
    last_config.toml                 the settings of the last Start or Save, shown again when the page loads

Uploads never escape their folder and never overwrite: a file name is reduced to its last component, stripped of
unsafe characters, and given a ``-1``, ``-2``… suffix when an image with the same stem (caption files are
per stem) already exists. Every image is decoded completely before it is kept (the trainer's own
:func:`trainer.dataset.inspect_image`); a file that cannot be trained on is reported with the reason and left out.
Zip files are read member by member into sanitized names (never ``extractall``), with limits on the member count,
the total uncompressed size and the compression ratio (zip bombs).
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import shutil
import stat
import unicodedata
import zipfile
from collections.abc import Iterable
from pathlib import Path

from trainer.dataset import IMAGE_EXTENSIONS, MASK_SUFFIX, UnusableImage, inspect_image

CAPTION_EXTENSION = ".txt"
MAX_NAME_LENGTH = 100
MAX_PIXELS = 40_000_000  # as dataset.max_pixels' default
MAX_FILE_BYTES = 200 * 2**20  # one uploaded image or caption
MAX_ZIP_MEMBERS = 5_000
MAX_ZIP_TOTAL_BYTES = 2 * 2**30  # uncompressed, all members together
MAX_ZIP_RATIO = 100  # uncompressed / compressed, per member above 1 MiB (zip-bomb guard)
MAX_CAPTION_BYTES = 64 * 1024
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_REPEATS = re.compile(r"^(\d+)_(.+)$")


class WorkspaceError(ValueError):
    """A user mistake with files or folders; the message says what to do."""


# ----- workspace ---------------------------------------------------------------------------------------------
class Workspace:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        for folder in (self.datasets, self.outputs, self.presets, self.jobs):
            folder.mkdir(parents=True, exist_ok=True)

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
    def last_config(self) -> Path:
        return self.root / "last_config.toml"

    def default_dataset(self) -> Path:
        return self.datasets / "my_dataset"


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


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


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
        lines += [f"left out {name}: {reason}" for name, reason in self.rejected]
        return "\n".join(lines)


@dataclasses.dataclass
class _Incoming:
    """One uploaded file: its original name (with any folder inside a zip) and its bytes."""

    name: str
    data: bytes


def concept_folder(dataset_dir: Path, concept: str, repeats: int) -> Path:
    """The folder for ``concept``: an existing ``N_concept`` (any N) or a new ``<repeats>_concept``."""
    concept = sanitize_folder_name(concept)
    if dataset_dir.is_dir():
        for folder in sorted(p for p in dataset_dir.iterdir() if p.is_dir()):
            match = _REPEATS.match(folder.name)
            if (match.group(2) if match else folder.name) == concept:
                return folder
    return dataset_dir / f"{max(1, int(repeats))}_{concept}"


def add_uploads(paths: Iterable[str | os.PathLike], target: Path, max_pixels: int = MAX_PIXELS) -> UploadReport:
    """Copy uploaded images, caption ``.txt`` files and ``.zip`` archives of them into ``target``."""
    report = UploadReport()
    incoming: list[_Incoming] = []
    for raw in paths:
        path = Path(raw)
        shown = path.name
        try:
            size = path.stat().st_size
        except OSError as error:
            report.rejected.append((shown, f"cannot read the upload ({error.strerror or error})"))
            continue
        if path.suffix.lower() == ".zip":
            try:
                incoming.extend(read_zip(path))
            except WorkspaceError as error:
                report.rejected.append((shown, str(error)))
            continue
        if size > MAX_FILE_BYTES:
            report.rejected.append((shown, f"file too large ({size / 2**20:.0f} MiB > {MAX_FILE_BYTES // 2**20} MiB)"))
            continue
        incoming.append(_Incoming(shown, path.read_bytes()))
    store(incoming, target, report, max_pixels)
    return report


def read_zip(path: Path) -> list[_Incoming]:
    """The usable members of a zip archive, read within the size limits (nothing is written here)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise WorkspaceError(f"not a readable zip archive ({error})") from None
    members: list[_Incoming] = []
    with archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        if len(infos) > MAX_ZIP_MEMBERS:
            raise WorkspaceError(f"too many files in the archive ({len(infos)} > {MAX_ZIP_MEMBERS})")
        total = sum(info.file_size for info in infos)
        if total > MAX_ZIP_TOTAL_BYTES:
            raise WorkspaceError(f"the archive unpacks to {total / 2**30:.1f} GiB, more than the "
                                 f"{MAX_ZIP_TOTAL_BYTES / 2**30:.0f} GiB allowed")
        read_total = 0
        for info in infos:
            parts = info.filename.replace("\\", "/").split("/")
            if any(part.startswith(".") and part not in (".", "..") or part == "__MACOSX" for part in parts):
                continue  # hidden files and macOS resource forks
            if stat.S_ISLNK(info.external_attr >> 16):
                raise WorkspaceError(f"{info.filename}: symbolic links are not allowed in an archive")
            if info.flag_bits & 0x1:
                raise WorkspaceError(f"{info.filename}: encrypted archives are not supported")
            if info.file_size > MAX_FILE_BYTES:
                raise WorkspaceError(f"{info.filename}: file too large ({info.file_size / 2**20:.0f} MiB)")
            if info.file_size > 2**20 and info.file_size > MAX_ZIP_RATIO * max(1, info.compress_size):
                raise WorkspaceError(f"{info.filename}: compression ratio above {MAX_ZIP_RATIO}:1 (zip bomb?)")
            try:
                with archive.open(info) as stream:  # zipfile stops at the declared size and checks the CRC
                    data = stream.read(MAX_FILE_BYTES + 1)
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError) as error:
                raise WorkspaceError(f"{info.filename}: cannot be unpacked ({error})") from None
            read_total += len(data)
            if len(data) > MAX_FILE_BYTES or read_total > MAX_ZIP_TOTAL_BYTES:
                raise WorkspaceError(f"{info.filename}: unpacks beyond the size limits")
            members.append(_Incoming("/".join(parts), data))
    return members


def store(files: list[_Incoming], target: Path, report: UploadReport, max_pixels: int = MAX_PIXELS) -> None:
    """Validate and write images first, then captions (each follows its image's stored stem)."""
    target.mkdir(parents=True, exist_ok=True)
    stored_stems: dict[tuple[str, str], str] = {}  # (folder inside the upload, uploaded stem) → stored stem
    captions: list[_Incoming] = []
    for item in files:
        folder, _, base = item.name.rpartition("/")
        if base.lower().endswith(CAPTION_EXTENSION):
            captions.append(item)
            continue
        if not is_image_name(base):
            report.rejected.append((item.name, f"not an image or caption file (accepted: {', '.join(IMAGE_EXTENSIONS)}"
                                               f", {CAPTION_EXTENSION}, .zip)"))
            continue
        name = sanitize_name(base, fallback="image")
        if not is_image_name(name):  # the extension did not survive sanitizing
            name = os.path.splitext(name)[0] + ".png"
        path = write_new_image(item.data, target, name, max_pixels, item.name, report)
        if path is not None:
            stored_stems[(folder, os.path.splitext(base)[0])] = path.stem
    for item in captions:
        folder, _, base = item.name.rpartition("/")
        stem = os.path.splitext(base)[0]
        stored = stored_stems.get((folder, stem))
        if stored is None:
            existing = [p for p in target.iterdir() if p.stem == sanitize_name(stem) and is_image_name(p.name)]
            if not existing:
                report.rejected.append((item.name, "caption file without an image of the same name"))
                continue
            stored = existing[0].stem
        try:
            text = decode_caption(item.data)
        except WorkspaceError as error:
            report.rejected.append((item.name, str(error)))
            continue
        caption_path = target / (stored + CAPTION_EXTENSION)
        write_text_atomic(caption_path, text)
        report.captions.append(caption_path)


def write_new_image(data: bytes, target: Path, name: str, max_pixels: int, shown: str,
                    report: UploadReport) -> Path | None:
    """Write ``data`` under a fresh name in ``target`` after decoding it completely; None (and a reason) if unusable."""
    if not data:
        report.rejected.append((shown, "empty file (0 bytes)"))
        return None
    temporary = target / f".upload-{secrets.token_hex(6)}{os.path.splitext(name)[1]}"
    temporary.write_bytes(data)
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


def write_text_atomic(path: Path, text: str) -> None:
    from methods.files import atomic_write_bytes

    atomic_write_bytes(path, (text + "\n" if text else "").encode("utf-8"))


# ----- datasets ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DatasetImage:
    path: Path
    folder: str  # concept folder name ("10_subject"), "" for images directly in the dataset folder
    caption: str


@dataclasses.dataclass
class Concept:
    folder: str
    name: str
    repeats: int
    images: int


def dataset_folder(text: str | os.PathLike) -> Path:
    if not str(text).strip():
        raise WorkspaceError("give a dataset folder")
    return Path(str(text).strip()).expanduser().resolve()


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_image_name(p.name))
    stems = {p.stem for p in files}
    return [p for p in files if not (p.stem.endswith(MASK_SUFFIX) and p.stem[: -len(MASK_SUFFIX)] in stems)]


def concept_folders(dataset_dir: Path) -> list[Path]:
    """The dataset folder itself and its immediate visible sub-folders (what the trainer reads)."""
    if not dataset_dir.is_dir():
        raise WorkspaceError(f"{dataset_dir}: no such folder")
    return [dataset_dir] + sorted(p for p in dataset_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(dataset_dir: Path, extension: str = CAPTION_EXTENSION) -> list[DatasetImage]:
    images = []
    for folder in concept_folders(dataset_dir):
        name = "" if folder == dataset_dir else folder.name
        images += [DatasetImage(path, name, read_caption(path, extension)) for path in _image_files(folder)]
    return images


def list_concepts(dataset_dir: Path) -> list[Concept]:
    concepts = []
    for folder in concept_folders(dataset_dir)[1:]:
        match = _REPEATS.match(folder.name)
        repeats, name = (int(match.group(1)), match.group(2)) if match else (1, folder.name)
        concepts.append(Concept(folder.name, name, repeats, len(_image_files(folder))))
    return concepts


def caption_path(image: Path, extension: str = CAPTION_EXTENSION) -> Path:
    extension = extension.strip() or CAPTION_EXTENSION
    return image.with_suffix(extension if extension.startswith(".") else "." + extension)


def read_caption(image: Path, extension: str = CAPTION_EXTENSION) -> str:
    path = caption_path(image, extension)
    try:
        return decode_caption(path.read_bytes())
    except (OSError, WorkspaceError):
        return ""


def check_image(dataset_dir: Path, image: str | os.PathLike) -> Path:
    """``image`` as a path inside the dataset (the UI sends it back from the browser: never trust it)."""
    path = Path(image).expanduser().resolve()
    if not is_inside(path, dataset_dir) or not path.is_file() or not is_image_name(path.name):
        raise WorkspaceError(f"{image}: not an image of the dataset {dataset_dir}; select an image in the gallery")
    return path


def write_caption(dataset_dir: Path, image: str | os.PathLike, text: str, extension: str = CAPTION_EXTENSION) -> Path:
    path = caption_path(check_image(dataset_dir, image), extension)
    write_text_atomic(path, clean_caption(text))
    return path


def _rewrite_captions(dataset_dir: Path, change, extension: str) -> int:
    changed = 0
    for item in list_images(dataset_dir, extension):
        new = clean_caption(change(item.caption))
        if new != item.caption:
            write_text_atomic(caption_path(item.path, extension), new)
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
    source = (dataset_dir / folder).resolve()
    if not folder or source == dataset_dir or not is_inside(source, dataset_dir) or not source.is_dir() \
            or source.parent != dataset_dir:
        raise WorkspaceError("images directly in the dataset folder count once; upload into a concept (sub-folder) "
                             "to set repeats" if not folder else f"{folder}: not a concept folder of {dataset_dir}")
    match = _REPEATS.match(source.name)
    name = match.group(2) if match else source.name
    target = dataset_dir / f"{repeats}_{name}"
    if target == source:
        return target
    if target.exists():
        raise WorkspaceError(f"{target.name} already exists")
    source.rename(target)
    return target


def delete_image(dataset_dir: Path, image: str | os.PathLike, extension: str = CAPTION_EXTENSION) -> None:
    path = check_image(dataset_dir, image)
    caption_path(path, extension).unlink(missing_ok=True)
    path.unlink()


def image_problem(image: Path, extension: str = CAPTION_EXTENSION, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why the trainer would skip ``image`` (its own decode check, and an unreadable caption), or None."""
    try:
        inspect_image(image, max_pixels)
    except UnusableImage as reason:
        return str(reason)
    caption = caption_path(image, extension)
    if caption.is_file():
        try:
            caption.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as error:
            return f"caption file {caption.name} is not UTF-8 ({error.reason} at byte {error.start})"
        except OSError as error:
            return f"cannot read caption file {caption.name} ({error.strerror or error})"
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
