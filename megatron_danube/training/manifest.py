"""Checkpoint manifests: every file's size and CRC32, written at save, checked before use.

A byte flip in a shard is otherwise invisible: torch's distributed checkpoint reader loads
whatever bytes it finds. The manifest is written after all shards are on disk and before the
folder is renamed into place, so a complete checkpoint always has one. CRC32 (zlib, several
GB/s) detects the damage that matters here (flipped bits, truncation, stale or foreign files);
it is not a defence against deliberate tampering.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Dict, List, Optional

MANIFEST_FILE = "manifest.json"
_CHUNK = 16 * 2**20


def file_crc32(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def list_files(folder: str) -> List[str]:
    """Relative paths of every file under `folder` but the manifest, sorted."""
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST_FILE:
                out.append(rel)
    return sorted(out)


def describe(folder: str, names: List[str]) -> Dict[str, dict]:
    return {
        name: {
            "size": os.path.getsize(os.path.join(folder, name)),
            "crc32": file_crc32(os.path.join(folder, name)),
        }
        for name in names
    }


def write_manifest(folder: str, entries: Dict[str, dict]) -> None:
    tmp = os.path.join(folder, MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"algorithm": "crc32", "files": entries}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST_FILE))


def read_manifest(folder: str) -> Optional[Dict[str, dict]]:
    """The manifest's entries, None when the folder has none; ValueError when unreadable."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        data = json.load(f)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise ValueError(f"{path} has no file list")
    return files


def check_files(folder: str, entries: Dict[str, dict], names: List[str]) -> Optional[str]:
    """The first problem among `names` (a share of the manifest's files), or None."""
    for name in names:
        path = os.path.join(folder, name)
        expected = entries[name]
        if not os.path.isfile(path):
            return f"{path} is missing"
        size = os.path.getsize(path)
        if size != expected["size"]:
            return f"{path} has {size} bytes, the manifest says {expected['size']}"
        if file_crc32(path) != expected["crc32"]:
            return f"{path} does not match its checksum (damaged)"
    return None


def verify_folder(folder: str, share: int = 0, shares: int = 1) -> Optional[str]:
    """Check this process's share of `folder`'s files; None when intact, else the problem.

    With `shares` processes each checking `share`, `shares` of the files (by index), the
    reading is spread over the ranks; the caller combines their answers.
    """
    try:
        entries = read_manifest(folder)
    except (OSError, ValueError) as exc:
        return f"{os.path.join(folder, MANIFEST_FILE)} is unreadable ({exc})"
    if entries is None:
        return f"{folder} has no {MANIFEST_FILE}"
    if share == 0:
        extra = sorted(set(list_files(folder)) - set(entries))
        if extra:
            return f"{os.path.join(folder, extra[0])} is not in the manifest"
    names = sorted(entries)[share::shares]
    return check_files(folder, entries, names)
