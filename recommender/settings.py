"""Deployment settings of the recommender app and CLI: where the knowledge base and the model server are.

One class, read from the environment (`PRODUCTLENS_<NAME>`; an empty variable counts as unset), each
default written once here. Ranking numbers are not settings: they live in params.yaml (`recommender:`).

    PRODUCTLENS_DB_URL               knowledge base (default sqlite:///artifacts/kb/productlens.db)
    PRODUCTLENS_MODEL_GRPC           model server gRPC address (default localhost:8500)
    PRODUCTLENS_MODEL_NAME           served model name (default productlens)
    PRODUCTLENS_MODEL_SIGNATURE      signature (default serving_default)
    PRODUCTLENS_MODEL_VERSION        a model version number, or
    PRODUCTLENS_MODEL_LABEL          a version label (e.g. stable); neither = the latest version
    PRODUCTLENS_CANARY_SHARE         share of requests (0..1) sent to the `canary` version label (default 0); the
                                     rest go to PRODUCTLENS_MODEL_LABEL, or to `stable` when that is unset
    PRODUCTLENS_MODEL_TIMEOUT_S      deadline of each model call, retries included (default 5)
    PRODUCTLENS_MAX_UPLOAD_BYTES     upload size cap (default 10 MiB)
    PRODUCTLENS_PARAMS               params.yaml holding the `recommender:` section (default params.yaml)
    PRODUCTLENS_GRACEFUL_SHUTDOWN_S  after SIGTERM, how long requests in flight may take (default 8)
    PRODUCTLENS_FEEDBACK_DIR         the feedback store of users' photos, <dir>/<sha256[:2]>/<sha256>.<ext> (default
                                     feedback)
    PRODUCTLENS_FEEDBACK_DB_URL      the database of the feedback table (default: the knowledge base's database when
                                     that is a server such as PostgreSQL; with the SQLite KB file, which every KB
                                     rebuild replaces, sqlite:///<feedback dir>/feedback.db)
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, PositiveFloat, PositiveInt, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.params import DEFAULT_PARAMS_PATH
from recommender.kb import DEFAULT_DB_PATH, sqlite_url
from serving.contract import SERVING_DEFAULT

ENV_PREFIX = "PRODUCTLENS_"


class Settings(BaseSettings):
    """Arguments win over environment variables, which win over the defaults below."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,
        frozen=True,
        extra="forbid",
        protected_namespaces=(),
        validate_by_name=True,
    )

    db_url: str = sqlite_url(DEFAULT_DB_PATH)
    model_grpc: str = "localhost:8500"
    model_name: str = "productlens"
    model_signature: str = SERVING_DEFAULT
    model_version: int | None = None
    model_label: str | None = None
    model_timeout_s: PositiveFloat = 5.0
    canary_share: float = Field(0.0, ge=0.0, le=1.0)
    max_upload_bytes: PositiveInt = 10 * 1024 * 1024
    params_path: Path = Field(DEFAULT_PARAMS_PATH, validation_alias=f"{ENV_PREFIX}PARAMS")
    # Under docker's 10 s stop timeout (compose) and Kubernetes' 30 s grace period, so a stalled upload is
    # cancelled and the app exits on its own instead of being killed.
    graceful_shutdown_s: PositiveFloat = 8.0
    feedback_dir: Path = Path("feedback")
    feedback_db_url: str | None = None

    @model_validator(mode="after")
    def _one_model_version_selector(self) -> Settings:
        if self.model_version is not None and self.model_label:
            raise ValueError(f"set {ENV_PREFIX}MODEL_VERSION or {ENV_PREFIX}MODEL_LABEL, not both")
        if self.model_version is not None and self.canary_share > 0:
            raise ValueError(f"{ENV_PREFIX}CANARY_SHARE needs version labels: unset {ENV_PREFIX}MODEL_VERSION")
        return self

    def feedback_database_url(self) -> str:
        """Where the feedback table lives: PRODUCTLENS_FEEDBACK_DB_URL, else beside the KB's tables on a database
        server, else a SQLite file in the feedback store (the SQLite KB file is a build output: `make kb` deletes
        it and renames a new one into place, which would lose every answer in it)."""
        if self.feedback_db_url:
            return self.feedback_db_url
        if not self.db_url.startswith("sqlite"):
            return self.db_url
        return sqlite_url(self.feedback_dir / "feedback.db")


def env_name(field: str) -> str:
    """The environment variable of a setting: `model_grpc` -> PRODUCTLENS_MODEL_GRPC."""
    alias = Settings.model_fields[field].validation_alias if field in Settings.model_fields else None
    return alias if isinstance(alias, str) else f"{ENV_PREFIX}{field.upper()}"


def settings_problems(error: ValidationError) -> str:
    """What is wrong with the settings, one line per setting, named by its environment variable."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"])
        name = env_name(where) if where in Settings.model_fields else where or "settings"
        lines.append(f"{name}: {problem['msg']} (got {problem['input']!r})" if where else f"{problem['msg']}")
    return "; ".join(lines)
