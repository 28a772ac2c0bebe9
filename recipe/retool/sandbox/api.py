"""The SandboxFusion ``/run_code`` contract (request and response models).

Unknown request fields are ignored, never rejected: clients add fields over time. What cannot be
run as asked is a client error (HTTP 422 with a message), never a server error: numbers must be
finite, text must be valid Unicode (no lone surrogates: it has to become UTF-8 files and streams),
file names must stay inside the work dir and file contents must be base64.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from recipe.retool.sandbox.worker import WORKDIR, relative_name

MAX_NAME_BYTES = 4096


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


class RunCodeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)

    code: str
    language: str = "python"
    run_timeout: float = Field(10.0, gt=0)
    compile_timeout: float = Field(10.0, gt=0)
    memory_limit_MB: int | None = None  # noqa: N815 (the wire name has a capital MB)
    stdin: str | None = None
    files: dict[str, str | None] = Field(default_factory=dict)  # path → base64 content
    fetch_files: list[str] = Field(default_factory=list)

    @field_validator("code", "stdin", "language")
    @classmethod
    def _text(cls, value: str | None, info: ValidationInfo) -> str | None:
        return value if value is None else _utf8(value, info.field_name)

    @field_validator("files")
    @classmethod
    def _files(cls, files: dict[str, str | None]) -> dict[str, str | None]:
        for name, content in files.items():
            _file_name(name)
            if content:
                try:
                    b64decode(content, validate=True)
                except (binascii.Error, ValueError):
                    raise ValueError(f"files[{name!r}] is not base64") from None
        return files

    @field_validator("fetch_files")
    @classmethod
    def _fetch(cls, names: list[str]) -> list[str]:
        for name in names:
            _file_name(name)
        return names


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
