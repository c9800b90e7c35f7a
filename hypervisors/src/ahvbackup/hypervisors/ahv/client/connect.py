"""One connection to a Prism deployment: the PC client plus lazily made PE clients.

Backup snapshots and changed regions exist only on Prism Element, at the cluster's external IP
on the same port as PC. `Prism.pe(cluster_uuid)` makes that client the first time it is needed,
with the same credentials, TLS settings and, above all, the same rate limiter as PC.
"""

from __future__ import annotations

__all__ = ["Prism", "connect_prism"]

import random
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import trio

from ahvbackup.core.errors import ApiServerError
from ahvbackup.core.secret import Secret

from .http import PrismHttp
from .models import Cluster
from .ratelimit import TokenBucket
from .v3 import PrismClient
from .v4 import JwtCookieAuth


@dataclass(frozen=True)
class _Settings:
    user: str
    password: Secret
    verify: bool | str
    retry_budget: float
    max_attempts: int
    timeout: float
    clock: Callable[[], float] | None
    rng: random.Random | None


class Prism:
    """`prism.pc` is Prism Central; `await prism.pe(cluster_uuid)` a Prism Element."""

    def __init__(
        self,
        pc: PrismClient,
        *,
        settings: _Settings,
        port: int,
        pe_transport_factory: Callable[[Cluster], httpx.AsyncBaseTransport | None] | None,
        pe_url: Callable[[Cluster], str] | None,
    ) -> None:
        self.pc = pc
        self.limiter = pc.limiter
        self._settings = settings
        self._port = port
        self._pe_transport_factory = pe_transport_factory
        self._pe_url = pe_url
        self._pes: dict[str, PrismClient] = {}
        self._clusters: dict[str, Cluster] = {}
        self._lock = trio.Lock()

    def remember(self, clusters: Iterable[Cluster]) -> None:
        """Clusters a list already described, so `pe` need not GET them one by one."""
        for c in clusters:
            self._clusters.setdefault(c.uuid, c)

    async def cluster(self, cluster_uuid: str) -> Cluster:
        """The cluster as PC describes it (cached for the connection)."""
        if cluster_uuid not in self._clusters:
            self._clusters[cluster_uuid] = await self.pc.get_cluster(cluster_uuid)
        return self._clusters[cluster_uuid]

    def pe_url_for(self, cluster: Cluster) -> str:
        if self._pe_url is not None:
            return self._pe_url(cluster)
        if not cluster.external_ip:
            raise ApiServerError(
                f"Prism at {self.pc.host}: cluster {cluster.name} ({cluster.uuid}) has no "
                "external IP (status.resources.network.external_ip), so its Prism Element "
                "cannot be reached",
                endpoint=f"GET /clusters/{cluster.uuid}",
            )
        ip = cluster.external_ip
        host = f"[{ip}]" if ":" in ip else ip
        return f"https://{host}:{self._port}"

    async def pe(self, cluster_uuid: str) -> PrismClient:
        """The Prism Element client of a cluster, made on first use."""
        async with self._lock:
            if cluster_uuid not in self._pes:
                cluster = await self.cluster(cluster_uuid)
                transport = (
                    self._pe_transport_factory(cluster) if self._pe_transport_factory else None
                )
                s = self._settings
                self._pes[cluster_uuid] = PrismClient(
                    self.pe_url_for(cluster), user=s.user, password=s.password, verify=s.verify,
                    retry_budget=s.retry_budget, max_attempts=s.max_attempts,
                    transport=transport, clock=s.clock, limiter=self.limiter,
                    timeout=s.timeout, rng=s.rng,
                )
            return self._pes[cluster_uuid]

    @asynccontextmanager
    async def jwt_pe(self, cluster: Cluster, jwt: Secret) -> AsyncIterator[PrismHttp]:
        """A transport to `cluster`'s Prism Element whose only credential is the JWT of a v4
        `discover-cluster` (the PE-side change-tracking calls), on the shared rate limit."""
        transport = self._pe_transport_factory(cluster) if self._pe_transport_factory else None
        s = self._settings
        http = PrismHttp(
            self.pe_url_for(cluster), user=s.user, password=s.password, verify=s.verify,
            retry_budget=s.retry_budget, max_attempts=s.max_attempts, transport=transport,
            clock=s.clock, limiter=self.limiter, timeout=s.timeout, rng=s.rng,
        )
        http.http.auth = JwtCookieAuth(jwt)
        try:
            yield http
        finally:
            await http.aclose()

    async def aclose(self) -> None:
        clients = [*self._pes.values(), self.pc]
        self._pes.clear()
        for client in clients:
            await client.aclose()


@asynccontextmanager
async def connect_prism(
    pc_url: str,
    *,
    user: str,
    password: Secret,
    verify: bool | str = True,
    rate_rpm: int = 30,
    retry_budget: float = 60.0,
    max_attempts: int = 6,
    timeout: float = 60.0,
    transport: httpx.AsyncBaseTransport | None = None,
    pe_transport_factory: Callable[[Cluster], httpx.AsyncBaseTransport | None] | None = None,
    pe_url: Callable[[Cluster], str] | None = None,
    clock: Callable[[], float] | None = None,
    rng: random.Random | None = None,
) -> AsyncIterator[Prism]:
    """`async with connect_prism("https://pc:9440", user=..., password=...) as prism:`.

    `transport` and `pe_transport_factory` let tests run the simulator in-process; `pe_url`
    overrides where a cluster's PE is reached (default `https://<external_ip>:<PC port>`).
    """
    settings = _Settings(
        user=user, password=password, verify=verify, retry_budget=retry_budget,
        max_attempts=max_attempts, timeout=timeout, clock=clock, rng=rng,
    )
    pc = PrismClient(
        pc_url, user=user, password=password, verify=verify, retry_budget=retry_budget,
        max_attempts=max_attempts, transport=transport, clock=clock,
        limiter=TokenBucket(rate_rpm), timeout=timeout, rng=rng,
    )
    port = httpx.URL(pc.base_url).port or 9440
    prism = Prism(
        pc, settings=settings, port=port, pe_transport_factory=pe_transport_factory,
        pe_url=pe_url,
    )
    try:
        yield prism
    finally:
        await prism.aclose()
