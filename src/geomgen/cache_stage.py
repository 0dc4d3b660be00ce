"""The Dispatcher's result cache: a request answered from the cache without
any worker, and results stored as they come back.

Methods of Dispatcher (dispatch.py), which holds the state they use
(``self.cache``, a cache.ResultCache or None when the broker runs without one).

A GPU result is looked up when a request is accepted (with the model identity
the backend's workers announced) and again when it is handed to a worker
whose identity differs (or when no worker had registered at acceptance); a
conversion result when its GLB is ready, fresh or cached. A request with
``fresh`` skips the lookups; its results are stored all the same. Failed
results are never stored. A lookup reads its entry in the broker loop (one
entry is at most defaults.CACHE_MAX_ENTRY_BYTES); a store is handed to the
cache's writer thread (see docs/architecture.md, "Result cache").
"""

from __future__ import annotations

import logging

from geomgen import cache as cache_codec
from geomgen.jobs import JobRecord
from geomgen.protocol import EventKind, JobResult, SdfResult
from geomgen.scheduling import GpuWorkerRecord

log = logging.getLogger("geomgen.broker")


def new_cache_counts() -> dict[str, int]:
    """Lookups by stage since the broker started: hits, misses, and GPU lookups skipped for ``fresh``."""
    return {"generate_hits": 0, "generate_misses": 0, "convert_hits": 0, "convert_misses": 0, "fresh": 0}


class CacheStage:
    """Dispatcher methods that read and fill the result cache."""

    # --- generate ----------------------------------------------------------------

    def _generate_key(self, job: JobRecord, model_identity: str) -> str | None:
        """The GPU result's key, or None when it cannot be cached (no cache, or
        no model identity). The input is hashed once per job."""
        if self.cache is None or not model_identity:
            return None
        if job.input_digest is None:
            job.input_digest = cache_codec.bytes_digest(job.request.input_data)
        req = job.request
        return cache_codec.generate_key(job.input_digest, backend=req.backend, model_identity=model_identity,
                                        options=job.terms.backend_options, input_name=req.input_name,
                                        prompt=req.prompt, debug=req.debug)

    def _answer_from_cache(self, job: JobRecord, now: float) -> bool:
        """At acceptance: True when the GLB came from the cache (the job then
        goes on to conversion, itself perhaps cached, or is finished)."""
        if self.cache is None:
            return False
        identity = self.model_identities.get(job.request.backend, "")
        key = self._generate_key(job, identity)
        if key is None:
            return False
        job.generate_key = key
        return self._use_cached_glb(job, key, now)

    def _answer_at_dispatch(self, job: JobRecord, worker: GpuWorkerRecord, now: float) -> bool:
        """Before ``worker`` gets the job: True when the GLB came from the cache
        (the worker is released, never sees it). Looked up under that worker's
        identity; and again under the key that missed at acceptance, since an
        identical request ahead of this one (a retried batch behind the
        original) may have finished in the meantime."""
        if self.cache is None:
            return False
        key = self._generate_key(job, worker.info.get("model_identity", ""))
        looked_up = key is not None and key == job.generate_key
        job.generate_key = key
        if key is None or (looked_up and job.request.fresh):
            return False
        job.waiting_in = None  # popped from its queue by the dispatch that got here
        if self._use_cached_glb(job, key, now, count_miss=not looked_up):
            self.workers.release(worker)
            return True
        return False

    def _use_cached_glb(self, job: JobRecord, key: str, now: float, count_miss: bool = True) -> bool:
        """Answer ``job``'s GPU stage from the cache entry under ``key``, if
        there is one (and the request is not ``fresh``). A miss is counted once
        per job: ``count_miss`` False for a second look."""
        if job.request.fresh:
            self.cache_counts["fresh"] += 1
            return False
        payload = self.cache.get(key)
        entry = cache_codec.unpack_generated(payload) if payload is not None else None
        if entry is None:
            if payload is not None:
                log.warning("cache entry %s is not a GPU result; computing it", key[:16])
            if count_miss:
                self.cache_counts["generate_misses"] += 1
            return False
        self.cache_counts["generate_hits"] += 1
        self.waits.cancel(job.job_id)
        job.from_cache_generate = True
        job.gen_info, job.debug_files = entry.info, entry.debug_files
        job.request.input_data = b""
        glb = entry.glb
        self.admission.resize(job.job_id, len(glb) if job.request.want_sdf else 0)
        self._event(job, EventKind.GLB_READY, glb=glb, timings=job.timings(now), worker="cache",
                    detail="from the result cache")
        if not job.request.want_sdf:
            self._finish(job, now)
        else:
            self._to_conversion(job, glb, now)
        return True

    def _store_generated(self, job: JobRecord, res: JobResult, glb: bytes) -> None:
        """A worker's GLB (a success) into the cache under the key set at dispatch."""
        if job.from_cache_generate:
            return
        self._store_generated_as(job.generate_key, res, glb)

    def _store_generated_as(self, key: str | None, res: JobResult, glb: bytes) -> None:
        """A worker's GLB (a success) into the cache under ``key`` (None: not cacheable).
        Also for a job that is gone (cancelled, its client lost): the GPU time is spent."""
        if self.cache is None or key is None:
            return
        entry = cache_codec.GeneratedEntry(glb, dict(res.info), dict(res.debug_files))
        size = len(glb) + sum(len(v) for v in entry.debug_files.values() if isinstance(v, (bytes, bytearray)))
        self.cache.put_soon(key, size, lambda: cache_codec.pack_generated(entry))

    # --- convert ---------------------------------------------------------------------

    def _converted_from_cache(self, job: JobRecord, glb: bytes, now: float) -> bool:
        """When the GLB is ready: True when the package came from the cache (the job is finished)."""
        if self.cache is None:
            return False
        key = cache_codec.convert_key(cache_codec.bytes_digest(glb), name=job.request.output_name,
                                      convert=job.terms.convert)
        job.convert_key = key
        if job.request.fresh:
            return False
        payload = self.cache.get(key)
        entry = cache_codec.unpack_converted(payload) if payload is not None else None
        if entry is None:
            self.cache_counts["convert_misses"] += 1
            return False
        self.cache_counts["convert_hits"] += 1
        job.from_cache_convert = True
        self._finish(job, now, files=entry.files, sdf_file=entry.sdf_file, info=entry.info)
        return True

    def _store_converted(self, job: JobRecord, res: SdfResult) -> None:
        """An SDF worker's package (a success) into the cache."""
        if self.cache is None or job.convert_key is None:
            return
        entry = cache_codec.ConvertedEntry(dict(res.files), res.sdf_file, dict(res.info))
        size = sum(len(v) for v in entry.files.values() if isinstance(v, (bytes, bytearray)))
        self.cache.put_soon(job.convert_key, size, lambda: cache_codec.pack_converted(entry))

    # --- reporting -----------------------------------------------------------------------

    def cache_summary(self) -> dict:
        """The health reply's ``cache`` map."""
        if self.cache is None:
            return {"enabled": False}
        return {**self.cache.summary(), **self.cache_counts}

    def cache_info(self, job: JobRecord) -> dict:
        """What the result says of the cache: each stage ``hit``, ``miss``, ``fresh`` (not looked up) or absent."""
        if self.cache is None:
            return {}

        def stage(hit: bool, key: str | None) -> str | None:
            if hit:
                return "hit"
            if key is None:
                return None
            return "fresh" if job.request.fresh else "miss"

        out = {"generate": stage(job.from_cache_generate, job.generate_key),
               "convert": stage(job.from_cache_convert, job.convert_key)}
        return {name: value for name, value in out.items() if value is not None}
