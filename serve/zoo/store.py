"""Where the model registry lives: beside the jobs, in the job store's database.

Every ingress, runner and stage replica reads the same records, so ``svd-serve models add``
changes what the whole cluster serves without a restart. SQLite (one node) keeps a ``models``
table in the job store's file; Redis (a cluster) keeps one hash under the job store's prefix.
Entries are small JSON documents; the registry is read whole (a few dozen models at most).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from serve.db.sqlite import SqliteDatabase, sqlite_errors

from .entry import ModelEntry

if TYPE_CHECKING:
    from ..config import JobStoreConfig

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id   TEXT PRIMARY KEY,
    data TEXT NOT NULL
)
"""


class ModelStore(ABC):
    """The registered models (not those the app config declares: see :class:`serve.zoo.ModelCatalog`)."""

    @abstractmethod
    def list(self) -> list[ModelEntry]:
        """Every stored entry, by id."""

    @abstractmethod
    def get(self, model_id: str) -> ModelEntry | None: ...

    @abstractmethod
    def put(self, entry: ModelEntry) -> bool:
        """Store ``entry`` (replacing one with its id); True if it is new."""

    @abstractmethod
    def delete(self, model_id: str) -> bool:
        """Remove an entry; True if there was one."""

    def close(self) -> None:
        pass


class SqliteModelStore(ModelStore):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        with sqlite_errors("model registry"):
            self._db = SqliteDatabase(path, schema=_SCHEMA, name="model registry")

    def list(self) -> list[ModelEntry]:
        with sqlite_errors("model registry"):
            rows = self._db.conn().execute("SELECT data FROM models ORDER BY id").fetchall()
        return [ModelEntry.model_validate_json(row[0]) for row in rows]

    def get(self, model_id: str) -> ModelEntry | None:
        with sqlite_errors("model registry"):
            row = self._db.conn().execute("SELECT data FROM models WHERE id = ?", (model_id,)).fetchone()
        return ModelEntry.model_validate_json(row[0]) if row else None

    def put(self, entry: ModelEntry) -> bool:
        with sqlite_errors("model registry"), self._db.transaction() as conn:
            existed = conn.execute("SELECT 1 FROM models WHERE id = ?", (entry.id,)).fetchone() is not None
            conn.execute("INSERT INTO models (id, data) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET data = "
                         "excluded.data", (entry.id, entry.model_dump_json()))
        return not existed

    def delete(self, model_id: str) -> bool:
        with sqlite_errors("model registry"), self._db.transaction() as conn:
            return conn.execute("DELETE FROM models WHERE id = ?", (model_id,)).rowcount > 0

    def close(self) -> None:
        self._db.close()


class RedisModelStore(ModelStore):
    def __init__(self, url: str, *, key_prefix: str) -> None:
        from serve.db.redis import check_key_prefix, connect_redis, redis_key

        self._redis = connect_redis(url)
        self._key = redis_key(check_key_prefix(key_prefix), "models")

    def list(self) -> list[ModelEntry]:
        from serve.db.redis import redis_errors

        with redis_errors("model registry"):
            values = self._redis.hgetall(self._key)
        return [ModelEntry.model_validate(json.loads(values[key])) for key in sorted(values)]

    def get(self, model_id: str) -> ModelEntry | None:
        from serve.db.redis import redis_errors

        with redis_errors("model registry"):
            value = self._redis.hget(self._key, model_id)
        return ModelEntry.model_validate_json(value) if value else None

    def put(self, entry: ModelEntry) -> bool:
        from serve.db.redis import redis_errors

        with redis_errors("model registry"):
            return bool(self._redis.hset(self._key, entry.id, entry.model_dump_json()))

    def delete(self, model_id: str) -> bool:
        from serve.db.redis import redis_errors

        with redis_errors("model registry"):
            return bool(self._redis.hdel(self._key, model_id))

    def close(self) -> None:
        self._redis.close()


def make_model_store(config: "JobStoreConfig") -> ModelStore:
    """The registry in the database ``config`` (the job store's) names."""
    if config.backend == "sqlite":
        return SqliteModelStore(config.sqlite_path)
    return RedisModelStore(config.redis_url, key_prefix=config.key_prefix)
