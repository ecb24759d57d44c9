"""A `.nemo` file (a tar, plain or gzip'ed) or an extracted NeMo directory, staged as one local directory.

The staged directory holds what the reader needs under fixed names:

    model_config.yaml
    vocab.json, merges.txt   (GPT-2 BPE)  and/or  tokenizer.model (SentencePiece), from the `nemo:` names the
                             config gives them (NeMo packs them under uuid-prefixed names)
    model_weights.ckpt | mp_rank_XX/ | tp_rank_XX_pp_rank_XXX/ | model_weights/   (whichever the source has)
    .source                  the path the user gave, for error messages

From an archive, small members (config, tokenizer) are read straight out of the tar; a torch.save weights file
stored uncompressed (NeMo's own format) is read in place, inside the .nemo (a `<name>.in-archive` note gives its
byte range; readers/nemo.py), and other weight files (a gzip'ed archive, a distributed checkpoint) are copied out
byte for byte. From a directory, the weights are symbolic links to the user's files. Either way nothing large is
copied from an uncompressed .nemo.

Safety: every member of an archive is checked before any byte is written. Absolute names, `..` components, links
(symbolic or hard) whose target leaves the archive, device files and fifos are refused with an ArchiveError naming the
member. Nothing is extracted with tarfile's own extract functions: only the contents of regular files are copied, to
paths built from checked names inside the staging directory.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tarfile
from pathlib import Path
from typing import IO

from omegaconf import OmegaConf

from templates.ft_python.ft_checkpoint import CheckpointError

CONFIG_NAME = "model_config.yaml"
SOURCE_NOTE = ".source"
LEGACY_WEIGHTS = "model_weights.ckpt"
DIST_WEIGHTS = "model_weights"
# Tokenizer config key -> the name exporter/tokenizer.py expects next to the shards.
TOKENIZER_KEYS = {"vocab_file": "vocab.json", "merge_file": "merges.txt", "model": "tokenizer.model"}
NEMO_PREFIX = "nemo:"
COPY_BUFFER = 16 << 20
IN_ARCHIVE_SUFFIX = ".in-archive"  # staged note: a weights file read in place inside the .nemo


class ArchiveError(CheckpointError):
    """The .nemo archive is unreadable or holds a member that would escape the extraction directory."""


def is_nemo_source(path: Path) -> bool:
    """A `.nemo` archive, or a directory with NeMo's model_config.yaml (an extracted .nemo) not yet staged."""
    path = Path(path)
    if path.is_dir():
        return (path / CONFIG_NAME).is_file() and not is_staged(path)
    return path.is_file() and (path.suffix == ".nemo" or _is_tar(path))


def is_staged(path: Path) -> bool:
    """A directory made by `stage`."""
    return (Path(path) / SOURCE_NOTE).is_file()


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def is_weight_path(name: str) -> bool:
    """Archive-relative names of weight files: legacy, TP/PP-sharded, or a distributed checkpoint directory."""
    parts = name.split("/")
    if parts == [LEGACY_WEIGHTS]:
        return True
    if len(parts) == 2 and parts[1] == LEGACY_WEIGHTS and (parts[0].startswith("mp_rank_") or parts[0].startswith("tp_rank_")):
        return True
    return parts[0] == DIST_WEIGHTS and len(parts) >= 2


# -- archive members -------------------------------------------------------------------------------------------
def _normalise(name: str) -> str:
    """`./a/b` -> `a/b`; `.` -> ``."""
    name = posixpath.normpath(name) if name not in ("", ".", "./") else ""
    return "" if name == "." else name


def check_member(member: tarfile.TarInfo) -> str:
    """The member's archive-relative name, or ArchiveError if extracting it could touch anything outside."""
    raw = member.name
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise ArchiveError(f"archive member {raw!r} has an absolute path")
    if ".." in raw.replace("\\", "/").split("/"):
        raise ArchiveError(f"archive member {raw!r} has a '..' component")
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise ArchiveError(f"archive member {raw!r} is a device file or fifo")
    name = _normalise(raw)
    if member.issym() or member.islnk():
        target = member.linkname
        # A symbolic link is relative to its own directory; a hard link names an archive member.
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target) if member.issym() else target)
        if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
            raise ArchiveError(f"archive member {raw!r} links outside the archive (to {target!r})")
    elif not (member.isfile() or member.isdir()):
        raise ArchiveError(f"archive member {raw!r} is neither a file, a directory nor a link")
    return name


class NemoArchive:
    """Checked members of a .nemo tar; reads members without extracting the archive."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            try:
                self.tar, self.plain = tarfile.open(self.path, "r:"), True  # NeMo's own format: uncompressed
            except tarfile.ReadError:
                self.tar, self.plain = tarfile.open(self.path, "r:*"), False  # older .nemo files: tar.gz
        except (tarfile.TarError, OSError) as error:
            raise ArchiveError(f"cannot open {self.path} as a .nemo (tar) archive: {error}") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        for member in self.tar.getmembers():
            name = check_member(member)
            if name:
                self.members[name] = member

    def close(self) -> None:
        self.tar.close()

    def open(self, name: str) -> IO[bytes]:
        member = self.members.get(name)
        if member is None or member.isdir():
            raise ArchiveError(f"{self.path} has no file {name!r}")
        handle = self.tar.extractfile(member)  # follows links inside the archive (checked above)
        if handle is None:
            raise ArchiveError(f"{self.path}: member {name!r} cannot be read")
        return handle

    def reference(self, name: str, destination: Path) -> bool:
        """Stage a torch.save weights member without copying it: a regular member of an uncompressed archive is one
        contiguous byte range of the .nemo, which the reader reads in place (readers/nemo.py `_RankFile`); a note
        `destination` + IN_ARCHIVE_SUFFIX says where. False (nothing written) when the member is not such a range."""
        member = self.members.get(name)
        if not (self.plain and member is not None and member.isreg() and not member.issparse()
                and posixpath.basename(name) == LEGACY_WEIGHTS):
            return False
        destination.parent.mkdir(parents=True, exist_ok=True)
        note = {"archive": str(self.path.resolve()), "member": name, "offset": member.offset_data,
                "size": member.size}
        referenced(destination).write_text(json.dumps(note))
        return True

    def copy_out(self, name: str, destination: Path) -> None:
        """Copy one member's bytes to `destination`. A regular member of an uncompressed archive is one contiguous
        byte range of the .nemo file: copied by the kernel (copy_file_range), as fast as `cp`."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        member = self.members.get(name)
        if self.plain and member is not None and member.isreg() and not member.issparse():
            with open(self.path, "rb") as source, open(destination, "wb") as target:
                offset, left = member.offset_data, member.size
                while left:
                    copied = _copy_range(source, target, offset, left)
                    if not copied:
                        raise ArchiveError(f"{self.path} is truncated: member {name!r}")
                    offset, left = offset + copied, left - copied
            return
        with self.open(name) as source, open(destination, "wb") as target:
            shutil.copyfileobj(source, target, COPY_BUFFER)


def referenced(path: Path) -> Path:
    """The note `NemoArchive.reference` leaves in place of the staged file `path`."""
    return path.with_name(path.name + IN_ARCHIVE_SUFFIX)


def weights_exist(path: Path) -> bool:
    """A staged weights file: copied out, linked, or referenced in its archive."""
    return path.is_file() or referenced(path).is_file()


def weights_location(path: Path) -> tuple[Path, int, int]:
    """(file, offset, size) of the bytes of the staged weights file `path`: the file itself, or the byte range of
    its member inside the .nemo archive."""
    note = referenced(path)
    if not path.exists() and note.is_file():
        where = json.loads(note.read_text())
        archive = Path(where["archive"])
        if archive.stat().st_size < where["offset"] + where["size"]:
            raise ArchiveError(f"{archive} is truncated: member {where['member']!r}")
        return archive, where["offset"], where["size"]
    return path, 0, path.stat().st_size


def _copy_range(source: IO[bytes], target: IO[bytes], offset: int, count: int) -> int:
    """Copy up to `count` bytes from `source` at `offset` to the end of `target`; returns bytes copied."""
    count = min(count, COPY_BUFFER * 64)
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(source.fileno(), target.fileno(), count, offset)
        except OSError:  # e.g. across file systems on old kernels: fall back to read + write
            pass
    source.seek(offset)
    data = source.read(count)
    target.write(data)
    return len(data)


# -- staging ---------------------------------------------------------------------------------------------------
def _tokenizer_members(config: dict, available: set[str], origin: Path) -> dict[str, str]:
    """{staged name: member name} for the tokenizer files model_config.yaml names."""
    tokenizer = config.get("tokenizer") or {}
    wanted: dict[str, str] = {}
    for key, staged in TOKENIZER_KEYS.items():
        value = tokenizer.get(key)
        if not isinstance(value, str) or not value:
            continue
        member = value[len(NEMO_PREFIX):] if value.startswith(NEMO_PREFIX) else posixpath.basename(value)
        member = _normalise(member)
        if member not in available:
            raise CheckpointError(
                f"{origin}: model_config.yaml tokenizer.{key} = {value!r}, but the checkpoint has no file {member!r}"
            )
        wanted[staged] = member
    return wanted


def read_config(text: str, origin: Path) -> dict:
    try:
        config = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except Exception as error:  # omegaconf/yaml raise many types; name the file either way
        raise CheckpointError(f"{origin}: cannot parse {CONFIG_NAME}: {error}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{origin}: {CONFIG_NAME} is not a mapping")
    return config


def source_config(source: Path) -> dict:
    """model_config.yaml of a .nemo archive or extracted directory, without staging anything (for checks that run
    before the conversion, e.g. which runtime can serve the model)."""
    source = Path(source)
    if source.is_dir():
        return read_config((source / CONFIG_NAME).read_text(), source)
    archive = NemoArchive(source)
    try:
        with archive.open(CONFIG_NAME) as handle:
            return read_config(handle.read().decode(), source)
    finally:
        archive.close()


def stage(source: Path, staging: Path) -> Path:
    """Fill the empty directory `staging` from a .nemo archive or an extracted NeMo directory; returns `staging`."""
    source = Path(source).resolve()
    staging = Path(staging)
    if source.is_dir():
        _stage_directory(source, staging)
    else:
        _stage_archive(source, staging)
    (staging / SOURCE_NOTE).write_text(str(source))
    return staging


def _stage_archive(source: Path, staging: Path) -> None:
    archive = NemoArchive(source)
    try:
        if CONFIG_NAME not in archive.members:
            raise ArchiveError(f"{source} has no {CONFIG_NAME}: not a NeMo checkpoint")
        with archive.open(CONFIG_NAME) as handle:
            text = handle.read().decode()
        config = read_config(text, source)
        (staging / CONFIG_NAME).write_text(text)
        files = {name for name, member in archive.members.items() if not member.isdir()}
        for staged, member in _tokenizer_members(config, files, source).items():
            archive.copy_out(member, staging / staged)
        weights = sorted(name for name in files if is_weight_path(name))
        if not weights:
            raise ArchiveError(f"{source} holds no weights ({LEGACY_WEIGHTS}, mp_rank_XX/, tp_rank_XX_pp_rank_XXX/ "
                               f"or {DIST_WEIGHTS}/)")
        for name in weights:
            if archive.reference(name, staging / name):
                continue
            archive.copy_out(name, staging / name)
    finally:
        archive.close()


def _stage_directory(source: Path, staging: Path) -> None:
    config_path = source / CONFIG_NAME
    text = config_path.read_text()
    config = read_config(text, source)
    (staging / CONFIG_NAME).write_text(text)
    files = {path.relative_to(source).as_posix() for path in source.rglob("*") if path.is_file()}
    for staged, member in _tokenizer_members(config, files, source).items():
        shutil.copy2(source / member, staging / staged)  # small files
    entries = [p for p in source.iterdir() if p.name == LEGACY_WEIGHTS or p.name == DIST_WEIGHTS
               or (p.is_dir() and (p.name.startswith("mp_rank_") or p.name.startswith("tp_rank_")))]
    if not entries:
        raise CheckpointError(f"{source} holds no weights ({LEGACY_WEIGHTS}, mp_rank_XX/, tp_rank_XX_pp_rank_XXX/ "
                              f"or {DIST_WEIGHTS}/)")
    for entry in entries:
        (staging / entry.name).symlink_to(entry)


def origin_of(staged: Path) -> str:
    note = Path(staged) / SOURCE_NOTE
    return note.read_text() if note.is_file() else str(staged)
