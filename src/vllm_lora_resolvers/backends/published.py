"""Published adapters in a bucket (S3, GCS): immutable version folders and a pointer to one.

``vllm-lora publish`` lays adapter ``NAME`` out as::

    PREFIX/NAME/_versions/VERSION/adapter_config.json    one folder per version, never rewritten
    PREFIX/NAME/_versions/VERSION/adapter_model.safetensors
    PREFIX/NAME/_versions/VERSION/model.sig              its signature, if signed
    PREFIX/NAME/adapter_current.json                      the pointer: which version NAME is
    PREFIX/NAME/_vllm-lora-conditional-write-probe        publish's check of the store

The pointer is written last, in one conditional write, so a lookup sees one version whole or the
other, never a mix. Its key sorts between ``adapter_config.json`` and ``adapter_model.*``, so the
one listing a lookup makes of the plain layout's files sees it too, with its ETag or generation:
an unchanged pointer costs no extra request. The pointer lists the version's files, its signature
among them, so a server that checks signatures finds it without listing the version folder.
``NAME@VERSION`` names one version folder directly.
The ``_`` of ``_versions`` keeps that folder out of reach of plain names (segments start with a
letter or digit).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Annotated, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from vllm_lora_resolvers.adapter import (
    ADAPTER_FILES,
    CONFIG_FILE,
    SIGNATURE_FILE,
    WEIGHTS_FILES,
    adapter_from_listing,
)
from vllm_lora_resolvers.errors import InvalidAdapterError
from vllm_lora_resolvers.names import MAX_REVISION_LENGTH, adapter_name_segments
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile

VERSIONS_FOLDER = "_versions"
POINTER_FILE = "adapter_current.json"
assert CONFIG_FILE < POINTER_FILE < min(WEIGHTS_FILES), "a lookup's one listing must see it"
#: A pointer is a few hundred bytes; anything much larger is not one.
MAX_POINTER_BYTES = 64 << 10
#: Previous versions a pointer remembers, newest first, for ``publish --rollback``.
MAX_HISTORY = 10
POINTER_FORMAT: Final = 1


def is_version(text: str) -> bool:
    """Whether ``text`` can name a version: one name segment (``[A-Za-z0-9][A-Za-z0-9._-]*``, no
    ``..``) of at most 128 characters, so that ``NAME@VERSION`` is a safe name.

    >>> is_version("3f2a9c1b7d4e"), is_version("v1.2"), is_version(".."), is_version("a/b")
    (True, True, False, False)
    """
    return len(text) <= MAX_REVISION_LENGTH and adapter_name_segments(text) == (text,)


def _checked_version(text: str) -> str:
    if not is_version(text):
        raise ValueError("not a version name ([A-Za-z0-9][A-Za-z0-9._-]*, at most 128 characters)")
    return text


Version = Annotated[str, AfterValidator(_checked_version)]


def _checked_adapter_file(text: str) -> str:
    if text not in (*ADAPTER_FILES, SIGNATURE_FILE):
        raise ValueError(f"not one of {', '.join((*ADAPTER_FILES, SIGNATURE_FILE))}")
    return text


#: What a pointer may declare as a file's ETag or generation: letters, digits and ``._:-``,
#: optionally in double quotes (S3 quotes its ETags); never whitespace, control characters or
#: anything that could end a header value or add to a URL query (``,``, ``&``, ``*``, ``"``).
OBJECT_VERSION = re.compile(r'"[A-Za-z0-9._:-]{1,254}"|[A-Za-z0-9._:-]{1,256}')


def _checked_object_version(text: str) -> str:
    if not OBJECT_VERSION.fullmatch(text):
        raise ValueError(
            "not an ETag or generation (letters, digits and ._:- only, optionally in double "
            "quotes, at most 256 characters)"
        )
    return text


def split_pin(name: str) -> tuple[str, str | None]:
    """``NAME@VERSION`` -> ``(NAME, VERSION)``; ``NAME`` -> ``(NAME, None)``.

    >>> split_pin("team/sql@v2"), split_pin("sql")
    (('team/sql', 'v2'), ('sql', None))
    """
    adapter, pinned, version = name.partition("@")
    return adapter, version if pinned else None


def version_folder(folder: str, version: str) -> str:
    """The key prefix of version ``version`` of the adapter whose key prefix is ``folder``.

    >>> version_folder("prod/sql/", "v2")
    'prod/sql/_versions/v2/'
    """
    return f"{folder}{VERSIONS_FOLDER}/{version}/"


class PublishedFile(BaseModel):
    """One file of a published version, as the version folder's listing showed it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Annotated[str, AfterValidator(_checked_adapter_file)]
    size: int = Field(ge=0)
    etag: Annotated[str, AfterValidator(_checked_object_version)]
    checksums: dict[
        Annotated[str, Field(pattern=r"^[a-z0-9]{1,16}$")],
        Annotated[str, Field(pattern=r"^[0-9a-f]{8,128}$")],
    ] = Field(default_factory=dict, max_length=8)

    @classmethod
    def listed(cls, file: RemoteFile) -> PublishedFile:
        """The entry of a file of a version folder's listing."""
        return cls(path=file.path, size=file.size, etag=file.etag, checksums=dict(file.checksums))

    def remote_file(self) -> RemoteFile:
        """The file as a lookup of the version folder would list it."""
        return RemoteFile(self.path, self.size, self.checksums, etag=self.etag)


class Pointer(BaseModel):
    """``adapter_current.json``: the version ``NAME`` is, its files, and the versions before it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1]
    version: Version
    files: tuple[PublishedFile, ...] = Field(min_length=2, max_length=3)
    #: The versions that were current before this one, newest first.
    history: tuple[Version, ...] = Field(max_length=MAX_HISTORY)
    updated_at: float

    @model_validator(mode="after")
    def _one_config_and_one_weights_file(self) -> Pointer:
        paths = [file.path for file in self.files]
        weights = [path for path in paths if path in WEIGHTS_FILES]
        if paths.count(CONFIG_FILE) != 1 or len(weights) != 1 or paths.count(SIGNATURE_FILE) > 1:
            raise ValueError(
                f"files must be {CONFIG_FILE} and one of {', '.join(WEIGHTS_FILES)}, and "
                f"{SIGNATURE_FILE} if signed"
            )
        return self

    def listing(self) -> dict[str, RemoteFile]:
        """The version folder's files, by name, as a lookup of that folder lists them."""
        return {file.path: file.remote_file() for file in self.files}


def parse_pointer(name: str, where: str, raw: bytes) -> Pointer:
    """The pointer of adapter ``name`` read at ``where``; `InvalidAdapterError` if it is not one."""
    if len(raw) > MAX_POINTER_BYTES:
        reason = f"over {MAX_POINTER_BYTES} bytes"
    else:
        try:
            return Pointer.model_validate_json(raw)
        except ValidationError as error:
            reason = "; ".join(
                f"{'.'.join(str(part) for part in problem['loc']) or 'pointer'}: {problem['msg']}"
                for problem in error.errors(include_url=False)[:3]
            )
    raise InvalidAdapterError(
        f"adapter {name!r}: {where} is not a valid adapter pointer ({reason[:500]}); publish the "
        "adapter again with `vllm-lora publish` or roll it back with `vllm-lora publish --rollback`"
    )


def published_adapter(
    name: str,
    location: str,
    version: str,
    listed: Mapping[str, RemoteFile],
    *,
    signature: bool = False,
) -> RemoteAdapter | None:
    """Version ``version`` of an adapter, from its version folder's files (``listed``, by name;
    its signature among them if ``signature``): its pointer's file list and a listing of the
    folder give one version string, so ``NAME`` and ``NAME@VERSION`` share one snapshot. ``None``
    if the folder holds no config."""
    adapter = adapter_from_listing(name, location, listed, signature=signature)
    if adapter is None:
        return None
    return dataclasses.replace(adapter, version=f"{version}:{adapter.version}")
