"""Every tunable default in one place, each with its unit.

Roles take these as keyword defaults; the command line and GeometryServer
override them. Durations end in ``_s`` and are converted to milliseconds only
at a ``poll()`` call.
"""

from __future__ import annotations

# --- network -----------------------------------------------------------------
HOST = "127.0.0.1"
CLIENT_PORT = 5555  # broker ROUTER for clients
WORKER_PORT = 5556  # broker ROUTER for GPU workers
SDF_JOB_PORT = 5557  # broker PUSH -> SDF workers
SDF_RESULT_PORT = 5558  # SDF workers PUSH -> broker PULL
MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # largest message a client or worker receives (ZMQ MAXMSGSIZE), bytes
MESSAGE_MARGIN_BYTES = 1024 * 1024  # room for a message's other fields beside its payload, bytes
MAX_GLB_BYTES = 256 * 1024 * 1024  # largest GLB (with debug files) a GPU worker may return, bytes
MAX_PACKAGE_BYTES = 256 * 1024 * 1024  # largest SDF package an SDF worker may return, bytes

# --- liveness ----------------------------------------------------------------
HEARTBEAT_INTERVAL_S = 1.0  # how often every peer says it is alive
HEARTBEAT_LIVENESS = 5  # missed intervals before a peer is declared dead
QUIET_AFTER_INTERVALS = 2  # a worker not heard from for this many of its intervals gets no new job
PEER_HEARTBEAT_MIN_S = 0.05  # heartbeat intervals a peer declares are clamped to this range, seconds,
PEER_HEARTBEAT_MAX_S = 30.0  # ... so no peer can disable liveness (or flood with heartbeats)
SDF_MAX_SLOTS = 256  # conversion slots an SDF worker may declare
POLL_INTERVAL_S = 0.25  # upper bound on a loop's sleep in poll()
ACTIVITY_LOG_INTERVAL_S = 60.0  # the broker logs one line of what it did in each such period (jobs log at DEBUG)
CLIENT_LIVENESS_S = 20.0  # a client holding jobs and silent this long is gone: its jobs are dropped
# Messages queued towards one client that does not read, then dropped (ZMQ SNDHWM). ZeroMQ's
# own default: at 100, a live client with 100 requests in flight at saturation lost results
# (bench_broker). The memory it bounds is this many messages, GLBs and packages included.
CLIENT_SEND_HWM = 1000
RECONNECT_MIN_S = 0.5  # first reconnect back-off of a worker
RECONNECT_MAX_S = 16.0  # back-off cap

# --- jobs --------------------------------------------------------------------
MAX_RETRIES = 2  # re-runs of a job whose worker was lost (so 3 attempts at most)
NO_WORKER_TIMEOUT_S = 30.0  # how long a request waits for a backend with no live worker
SDF_LEASE_S = 10.0  # an SDF job not seen in any worker heartbeat for this long is re-pushed
SDF_CONVERT_TIMEOUT_S = 600.0  # a conversion child running longer is killed
CPU_GENERATE_TIMEOUT_S = 300.0  # a CPU backend's generate() running longer is abandoned (its process killed), seconds
GPU_GENERATE_TIMEOUT_S = 1800.0  # the same for a GPU backend (hunyuan3d, sam3d), seconds
CLIENT_TIMEOUT_S = 60.0  # broker silence after which a client fails its outstanding items
CLIENT_MAX_IN_FLIGHT = 64  # requests one generate() call keeps outstanding at the broker

# --- admission (what the broker holds: accepted jobs not yet finished, and their bytes) ---
MAX_HELD_JOBS = 20_000  # jobs, all clients together; more are refused `busy`
MAX_HELD_BYTES = 256 * 1024 * 1024  # input and GLB bytes held, all clients together, bytes
MAX_CLIENT_JOBS = 5_000  # jobs one client identity may have at the broker
MAX_CLIENT_BYTES = 128 * 1024 * 1024  # input and GLB bytes one client identity may have at the broker, bytes
BUSY_RETRY_MIN_S = 0.5  # shortest retry-after a `busy` refusal suggests, seconds
BUSY_RETRY_MAX_S = 30.0  # longest retry-after a `busy` refusal suggests, seconds

# --- inputs ------------------------------------------------------------------
MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard, pixels (width x height)
MAX_INPUT_BYTES = 64 * 1024 * 1024  # largest input file a client will send, bytes

# --- conversion --------------------------------------------------------------
DENSITY_KG_M3 = 500.0  # used when neither mass_kg, density_kg_m3 nor material is given
SILHOUETTE_HEIGHT_M = 1.0  # height of a silhouette reconstruction when no size is asked

# --- result cache (cache.py) ---------------------------------------------------
CACHE_SIZE_BYTES = 10 * 1024**3  # what the result cache may hold on disk, bytes (--cache-size); LRU beyond
# Largest entry stored (a GLB with its debug files, or an SDF package), bytes. It bounds what one
# cache hit reads inside the broker loop: about 30-60 ms and twice this in memory, once per hit.
CACHE_MAX_ENTRY_BYTES = 64 * 1024 * 1024
CACHE_PENDING_BYTES = 256 * 1024 * 1024  # results queued for the cache's writer thread at most, bytes; more are not cached
