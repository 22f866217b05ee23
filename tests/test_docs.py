"""The README and `.env.example` document every setting the services read."""

from __future__ import annotations

import pytest
from imgpipe import settings
from imgpipe_reconciler.settings import ReconcileSettings
from imgpipe_status.app import SseSettings
from imgpipe_worker.settings import WorkerSettings
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from tests.stack import REPO

SETTINGS: list[type[BaseSettings]] = [
    *(
        cls
        for cls in vars(settings).values()
        if isinstance(cls, type) and issubclass(cls, BaseSettings) and cls is not BaseSettings
    ),
    WorkerSettings,
    SseSettings,
    ReconcileSettings,
]


def env_names() -> set[str]:
    names = set()
    for cls in SETTINGS:
        prefix = cls.model_config.get("env_prefix", "")
        for field, info in cls.model_fields.items():
            alias = info.validation_alias
            names.add(
                str(alias.choices[0]) if isinstance(alias, AliasChoices) else f"{prefix}{field}".upper()
            )
    return names


def test_the_settings_are_found() -> None:
    names = env_names()
    assert {"IMGPIPE_AMQP_URL", "IMGPIPE_REDIS_URL", "IMGPIPE_NAMESPACE", "IMGPIPE_S3_REGION"} <= names
    assert len(names) > 30


@pytest.mark.parametrize("document", ["README.md", ".env.example"])
def test_every_setting_is_documented(document: str) -> None:
    text = (REPO / document).read_text()
    missing = sorted(name for name in env_names() if name not in text)
    assert not missing, f"{document} does not mention {missing}"
