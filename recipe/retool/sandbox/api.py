"""The SandboxFusion ``/run_code`` contract (request and response models).

Unknown request fields are ignored, never rejected: clients add fields over time.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class RunStatus(str, Enum):
    FINISHED = "Finished"
    ERROR = "Error"
    TIME_LIMIT_EXCEEDED = "TimeLimitExceeded"


class SandboxStatus(str, Enum):
    SUCCESS = "Success"  # ran, exit code 0
    FAILED = "Failed"  # ran, non-zero exit or time limit
    SANDBOX_ERROR = "SandboxError"  # the server could not run it


class RunCodeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    code: str
    language: str = "python"
    run_timeout: float = Field(10.0, gt=0)
    compile_timeout: float = Field(10.0, gt=0)
    memory_limit_MB: int | None = None  # noqa: N815 (the wire name has a capital MB)
    stdin: str | None = None
    files: dict[str, str | None] = Field(default_factory=dict)  # path → base64 content
    fetch_files: list[str] = Field(default_factory=list)


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
