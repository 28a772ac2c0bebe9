"""The SandboxFusion ``/run_code`` contract (request and response models).

Unknown request fields are ignored, never rejected: clients add fields over time. What cannot be
run as asked is a client error (HTTP 422 with a message), never a server error: numbers must be
finite, text must be valid Unicode (no lone surrogates: it has to become UTF-8 files and streams),
file names must stay inside the work dir and file contents must be base64.

Input files are bounded (:class:`RequestLimits`; the server's own through :func:`request_model` and
the validation context): how many, how deep and how long each path, and their total size, each
refused with a message that names the limit and its option. The counts of ``files`` and
``fetch_files`` are checked while the JSON is parsed, before any name is.
"""

from __future__ import annotations

import binascii
import functools
from base64 import b64decode
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator

from recipe.retool.sandbox.worker import WORKDIR, relative_name

MAX_NAME_BYTES = 4096  # any file name (fetch_files too): PATH_MAX
NAME_MAX = 255  # one component of a path


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of a worker before its code runs (the server's from ``SandboxConfig``)."""

    max_files: int = 256  # input files
    max_path_depth: int = 64  # directories an input file's path goes down
    max_path_bytes: int = 1024  # an input file's path, in UTF-8
    max_files_bytes: int = 64 << 20  # all input files together, decoded
    max_fetch_files: int = 256


DEFAULT_LIMITS = RequestLimits()


def _limits(info: ValidationInfo) -> RequestLimits:
    return info.context if isinstance(info.context, RequestLimits) else DEFAULT_LIMITS


def _shown(name: str) -> str:
    return repr(name if len(name) <= 40 else name[:40] + "…")


class RunStatus(str, Enum):
    FINISHED = "Finished"  # the program ran to completion, whatever its exit code
    ERROR = "Error"  # the sandbox could not run it at all
    TIME_LIMIT_EXCEEDED = "TimeLimitExceeded"


class SandboxStatus(str, Enum):
    SUCCESS = "Success"  # ran, exit code 0
    FAILED = "Failed"  # ran, non-zero exit or time limit
    SANDBOX_ERROR = "SandboxError"  # the server could not run it


def _utf8(value: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text (position {exc.start})") from None
    return value


def _file_name(name: str) -> str:
    _utf8(name, "file name")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"file name longer than {MAX_NAME_BYTES} bytes")
    relative_name(name, WORKDIR)  # ValueError: empty, NUL, or leaves the work dir
    return name


def _input_file_name(name: str, limits: RequestLimits) -> None:
    """An input file's path: what :func:`_file_name` checks, and how deep and long it may be."""
    _file_name(name)
    parts = relative_name(name, WORKDIR).split("/")
    if len(parts) > limits.max_path_depth:
        raise ValueError(f"file path {_shown(name)} is {len(parts)} levels deep, over the limit of "
                         f"{limits.max_path_depth} (--max-path-depth)")
    size = len(name.encode("utf-8"))
    if size > limits.max_path_bytes:
        raise ValueError(f"file path {_shown(name)} is {size} bytes long, over the limit of "
                         f"{limits.max_path_bytes} (--max-path-bytes)")
    longest = max(len(p.encode("utf-8")) for p in parts)
    if longest > NAME_MAX:
        raise ValueError(f"file path {_shown(name)} has a name of {longest} bytes, over the limit of {NAME_MAX}")


class RunCodeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)

    code: str
    language: str = "python"
    run_timeout: float = Field(10.0, gt=0)
    compile_timeout: float = Field(10.0, gt=0)
    memory_limit_MB: int | None = None  # noqa: N815 (the wire name has a capital MB)
    stdin: str | None = None
    # path → base64 content; how many are allowed is checked as the JSON is parsed (``max_length``,
    # in pydantic-core), before any name is looked at: see request_model
    files: dict[str, str | None] = Field(default_factory=dict, max_length=DEFAULT_LIMITS.max_files)
    fetch_files: list[str] = Field(default_factory=list, max_length=DEFAULT_LIMITS.max_fetch_files)

    @field_validator("code", "stdin", "language")
    @classmethod
    def _text(cls, value: str | None, info: ValidationInfo) -> str | None:
        return value if value is None else _utf8(value, info.field_name)

    @field_validator("files")
    @classmethod
    def _files(cls, files: dict[str, str | None], info: ValidationInfo) -> dict[str, str | None]:
        limits, total = _limits(info), 0
        for name, content in files.items():
            _input_file_name(name, limits)
            if content:
                try:
                    total += len(b64decode(content, validate=True))
                except (binascii.Error, ValueError):
                    raise ValueError(f"files[{name!r}] is not base64") from None
        if total > limits.max_files_bytes:
            raise ValueError(f"the files total {total} bytes, over the limit of {limits.max_files_bytes} "
                             f"(--max-files-mb)")
        return files

    @field_validator("fetch_files")
    @classmethod
    def _fetch(cls, names: list[str]) -> list[str]:
        for name in names:
            _file_name(name)
        return names


@functools.lru_cache(maxsize=8)
def request_model(limits: RequestLimits = DEFAULT_LIMITS) -> type[RunCodeRequest]:
    """:class:`RunCodeRequest` with ``limits``' counts of ``files`` and ``fetch_files``; validate with
    ``model_validate_json(body, context=limits)`` for the rest of them. A count checked by a Python
    validator would first have a million names turned into a dict (twice the time of parsing them)."""
    if (limits.max_files, limits.max_fetch_files) == (DEFAULT_LIMITS.max_files, DEFAULT_LIMITS.max_fetch_files):
        return RunCodeRequest
    return create_model(
        "RunCodeRequest", __base__=RunCodeRequest,
        files=(dict[str, str | None], Field(default_factory=dict, max_length=limits.max_files)),
        fetch_files=(list[str], Field(default_factory=list, max_length=limits.max_fetch_files)),
    )


_COUNTED = {"files": ("files", "--max-files"), "fetch_files": ("names", "--max-fetch-files")}


def explain(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors as the client sees them: a count over its limit names the limit's option."""
    out = []
    for err in errors:
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "too_long" and loc and loc[0] in _COUNTED:
            what, option = _COUNTED[loc[0]]
            limit = (err.get("ctx") or {}).get("max_length")
            err = {**err, "msg": f"{loc[0]}: more than {limit} {what}, over the limit ({option})"}
        out.append(err)
    return out


class RunResult(BaseModel):
    status: RunStatus
    execution_time: float | None = None
    cpu_time: float | None = None
    return_code: int | None = None
    stdout: str = ""
    stderr: str = ""


class RunCodeResponse(BaseModel):
    status: SandboxStatus
    message: str = ""
    compile_result: RunResult | None = None
    run_result: RunResult | None = None
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)
