"""Corpus readers: what an input is, its work units, and its items (audio bytes + transcript).

Three inputs, told apart by what SRC is:

* a folder tree of audio with same-stem transcripts: the fish-speech layout
  (``SPEAKER/name.wav|flac|mp3|ogg|opus`` + ``name.lab``) and the LibriTTS layout
  (``SPEAKER/CHAPTER/name.wav`` + ``name.normalized.txt``; ``name.txt`` also counts); the speaker is
  the first folder below SRC;
* a manifest ``*.jsonl|*.csv|*.tsv`` with columns path, text and optionally speaker, language,
  duration, source, key (other columns go into each sample's metadata); relative paths are
  relative to the manifest;
* WebDataset tars of audio (``key.flac|wav|mp3|opus|ogg`` + ``key.json`` and/or ``key.txt``), a tar,
  a folder of tars, or an ``s3://`` prefix or tar URL: how corpora such as Emilia are distributed.

Sample keys are ``SOURCE/...`` derived from the input alone (the relative path, the manifest's key
or path, the tar name and member key), never from the order of processing.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from storage import fs

AUDIO_EXTS = ("wav", "flac", "mp3", "ogg", "opus")
TRANSCRIPT_EXTS = (".normalized.txt", ".lab", ".txt")  # first found wins
MANIFEST_EXTS = (".jsonl", ".csv", ".tsv")
MANIFEST_COLUMNS = ("path", "text", "speaker", "language", "duration", "source", "key")


class InputError(ValueError):
    """An input that cannot be read as any corpus layout (exit 3)."""


@dataclass
class Item:
    key: str
    read: Callable[[], bytes]
    text: Optional[str]  # None: no transcript at all
    speaker: str = ""
    language: str = ""
    origin: str = ""  # the file or tar member it came from
    extra: dict = field(default_factory=dict)


def clean_component(s: str) -> str:
    """A key path component: no '.', no control characters, no empty parts."""
    s = re.sub(r"[\x00-\x1f\x7f]", "", s).replace(".", "_").strip()
    return s or "_"


def make_key(*parts: str) -> str:
    comps = [clean_component(c) for p in parts for c in str(p).replace("\\", "/").split("/") if c not in ("", ".")]
    return "/".join(comps)


def _read_text_file(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


class Source:
    """One ``--input``: ``kind`` is 'folder', 'manifest' or 'tars'."""

    kind = ""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name

    def describe(self) -> dict:
        return {"kind": self.kind, "url": self.url, "name": self.name}


class ListedSource(Source):
    """Folder and manifest: every item is listed up front (sorted / in manifest order)."""

    def items(self) -> list[Item]:
        raise NotImplementedError


class FolderSource(ListedSource):
    kind = "folder"

    def items(self) -> list[Item]:
        root = fs.local_path(self.url)
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                stem, dot, ext = fn.rpartition(".")
                if not dot or ext.lower() not in AUDIO_EXTS:
                    continue
                path = os.path.join(dirpath, fn)
                rel = os.path.relpath(path, root)
                text = None
                for t_ext in TRANSCRIPT_EXTS:
                    text = _read_text_file(os.path.join(dirpath, stem + t_ext))
                    if text is not None:
                        break
                parts = rel.replace(os.sep, "/").split("/")
                speaker = parts[0] if len(parts) > 1 else ""
                out.append(Item(key=make_key(self.name, rel.rpartition(".")[0]), read=_file_reader(path),
                                text=text, speaker=speaker, origin=path))
        return out


def _file_reader(path: str) -> Callable[[], bytes]:
    return lambda: fs.read_bytes(path)


class ManifestSource(ListedSource):
    kind = "manifest"

    def _rows(self) -> Iterator[tuple[int, dict]]:
        raw = fs.read_bytes(self.url).decode("utf-8-sig")
        if self.url.endswith(".jsonl"):
            for n, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        raise InputError(f"{self.url}:{n}: not JSON ({e})") from None
                    if not isinstance(row, dict):
                        raise InputError(f"{self.url}:{n}: expected a JSON object")
                    yield n, row
        else:
            delim = "\t" if self.url.endswith(".tsv") else ","
            reader = csv.DictReader(io.StringIO(raw), delimiter=delim)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise InputError(f"{self.url}: the header needs a 'path' column (and 'text'), got {reader.fieldnames}")
            for n, row in enumerate(reader, 2):
                yield n, {k: v for k, v in row.items() if k is not None and v not in (None, "")}

    def items(self) -> list[Item]:
        base = fs.dirname(self.url)
        out, seen = [], set()
        for n, row in self._rows():
            if "path" not in row:
                raise InputError(f"{self.url}:{n}: row has no 'path'")
            p = str(row["path"])
            path = p if (fs.is_remote(p) or os.path.isabs(p)) else fs.join(base, p)
            rel = str(row.get("key") or (p if not (fs.is_remote(p) or os.path.isabs(p)) else p.split("://")[-1]).rpartition(".")[0] or p)
            key = make_key(self.name, rel)
            if key in seen:
                raise InputError(f"{self.url}:{n}: key {key!r} appears twice (give a unique 'key' column)")
            seen.add(key)
            text = row.get("text")
            extra = {k: v for k, v in row.items() if k not in MANIFEST_COLUMNS}
            if row.get("duration") is not None:
                extra["manifest_duration_s"] = float(row["duration"])
            if row.get("source") is not None:
                extra["source"] = str(row["source"])
            out.append(Item(key=key, read=_file_reader(path), text=None if text is None else str(text),
                            speaker=str(row.get("speaker") or ""), language=str(row.get("language") or ""),
                            origin=path, extra=extra))
        return out


class TarSource(Source):
    kind = "tars"

    def tars(self) -> list[str]:
        u = self.url
        if u.endswith(".tar"):
            return [u]
        found = sorted(x for x in fs.listdir(u) if x.endswith(".tar"))
        if not found:
            raise InputError(f"{u}: no .tar files")
        return found

    @staticmethod
    def items(tar_url: str, source_name: str) -> Iterator[Item]:
        """Stream one tar's samples in member order (one pass, nothing cached beyond a sample)."""
        from ..shard_format import split_member_name

        tar_stem = fs.basename(tar_url)[: -len(".tar")]
        pending: dict[str, dict[str, bytes]] = {}
        order: list[str] = []
        with fs.open_file(tar_url) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_member_name(m.name)
                data = tf.extractfile(m).read()
                if key not in pending:
                    # WebDataset keeps a sample's members together: a new key finishes the older ones.
                    for k in order:
                        yield TarSource._item(pending.pop(k), k, tar_url, tar_stem, source_name)
                    order = []
                    pending[key] = {}
                    order.append(key)
                pending[key][ext.lower()] = data
        for k in order:
            yield TarSource._item(pending.pop(k), k, tar_url, tar_stem, source_name)

    @staticmethod
    def _item(members: dict[str, bytes], key: str, tar_url: str, tar_stem: str, source_name: str) -> Item:
        audio_ext = next((e for e in AUDIO_EXTS if e in members), None)
        meta: dict = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8"))
                if not isinstance(meta, dict):
                    meta = {}
            except ValueError:
                meta = {}
        text = None
        if "txt" in members:
            text = members["txt"].decode("utf-8", errors="replace")
        else:
            for k in ("text", "transcript", "sentence", "normalized_text"):
                if isinstance(meta.get(k), str):
                    text = meta[k]
                    break
        data = members.get(audio_ext, b"") if audio_ext else b""
        extra = {}
        if "duration" in meta:
            try:
                extra["manifest_duration_s"] = float(meta["duration"])
            except (TypeError, ValueError):
                pass
        return Item(key=make_key(source_name, tar_stem, key), read=lambda d=data: d, text=text,
                    speaker=str(meta.get("speaker") or ""), language=str(meta.get("language") or ""),
                    origin=f"{tar_url}#{key}.{audio_ext or '?'}", extra=extra)


def open_source(url: str, name: Optional[str] = None) -> Source:
    """Classify ``url`` (optionally ``NAME=url``) as a folder, manifest or tars input."""
    if name is None and "=" in url and not url.split("=", 1)[0].count("/"):
        name, url = url.split("=", 1)
    base = fs.basename(url.rstrip("/"))
    if url.endswith(MANIFEST_EXTS):
        if not fs.exists(url):
            raise InputError(f"{url}: no such manifest")
        return ManifestSource(url, name or base.rpartition(".")[0])
    if url.endswith(".tar"):
        if not fs.exists(url):
            raise InputError(f"{url}: no such tar")
        return TarSource(url, name or fs.basename(fs.dirname(url)) or "tars")
    if fs.is_remote(url):
        return TarSource(url, name or base)
    if not os.path.isdir(url):
        raise InputError(f"{url}: not a folder, a manifest (.jsonl/.csv/.tsv) or a .tar")
    entries = os.listdir(url)
    if any(e.endswith(".tar") for e in entries) and not any(os.path.isdir(os.path.join(url, e)) for e in entries):
        return TarSource(url, name or base)
    return FolderSource(url, name or base)
