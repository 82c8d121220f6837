"""Locust users for clip-serve, sending loadgen's workloads (loadtests/workloads.py).

    locust -f loadtests/locustfile.py                       # web UI on :8089, host 127.0.0.1:8000
    locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 60s ImageUser
    locust -f loadtests/locustfile.py --headless -u 32 -r 8 -t 60s TextUser ClassifyUser

ImageUser: POST /embed with one photo-like JPEG. TextUser: one unique short caption.
ClassifyUser: one JPEG against the same 10 moderation labels. MixedUser: 40% image,
40% text, 20% classify. Each user sends its next request as soon as the last is answered
(a closed loop, like `loadgen.py --concurrency`). Hosts other than this machine are refused.

loadgen.py reports batch sizes, refusals and Retry-After; Locust gives its own live charts.
"""

from __future__ import annotations

import gevent
from loadgen import check_local
from locust import HttpUser, constant, events, task
from workloads import Workload, image_pool

DEFAULT_HOST = "http://127.0.0.1:8000"


@events.init.add_listener
def _local_only(environment, **_kwargs) -> None:
    check_local(environment.host or DEFAULT_HOST)
    image_pool()  # encoded once, before any user starts
    # Encoding takes seconds with gevent's hub idle, so the hub's cached clock is that far
    # behind; Locust's --run-time timer, armed next, would fire early by as much.
    gevent.get_hub().loop.update_now()


# One sequence per workload for all users, so no two users send the same caption.
_WORKLOADS = {name: Workload(name, seed=0) for name in ("image1", "text", "classify", "mix")}


class _ClipUser(HttpUser):
    abstract = True
    host = DEFAULT_HOST
    wait_time = constant(0)
    workload = "image1"

    @task
    def send(self) -> None:
        call = _WORKLOADS[self.workload].next()
        # Named by workload, so Locust's table has one row for each request shape.
        self.client.post(call.path, data=call.body, name=call.kind,
                         headers={"content-type": "application/json"})


class ImageUser(_ClipUser):
    workload = "image1"


class TextUser(_ClipUser):
    workload = "text"


class ClassifyUser(_ClipUser):
    workload = "classify"


class MixedUser(_ClipUser):
    workload = "mix"
