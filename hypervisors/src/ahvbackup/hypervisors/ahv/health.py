"""The ahv driver's pre-flight checks (`ahvbackup health-check`, steps 1 to 5).

In order, each timed, each with a fix hint when it fails, a later step skipped when the one it
needs failed:

1. ``tls``: TCP connect and TLS handshake with Prism Central, verified as jobs verify it; on a
   failure the certificate Prism presented (subject, issuer, validity, SANs, fingerprint) and the
   CA bundle it was checked against are shown;
2. ``auth``: ``GET /users/me`` with the configured user and password;
3. ``clusters``: the AOS clusters PC lists, ``cluster=`` resolved by name or uuid, and each
   selected cluster's Prism Element reached (backup snapshots and change tracking live there);
4. ``rbac``: every permission a backup (for the configured data path) and a restore to AHV
   need, checked against the caller's roles, each missing one named;
5. ``iscsi``: each selected cluster's data services IP (``dsip=`` or Prism's), a TCP connect to
   it on ``iscsi_port`` and a SendTargets discovery with our own initiator.

Nothing is created on the cluster. The requests go through the Prism client (TLS, auth, error
messages) with a short retry budget and without the job's rate limit: a handful of calls.

`_V3Api` is the one place that knows v3 paths; `_V4Api` lists clusters through clustermgmt v4;
`_api_for` picks one by ``prism_api_version`` (``auto``: v4 when version discovery lists it).
"""

from __future__ import annotations

__all__ = ["BACKUP_RESTORE_PERMISSIONS", "Needed", "run_health_checks"]

import datetime as dt
import hashlib
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ahvbackup.core.errors import (
    AhvBackupError,
    ApiAuthError,
    ApiError,
    ApiNotFoundError,
    ConfigError,
    DataPathError,
    ExitCode,
)
from ahvbackup.core.health import FAIL, OK, WARN, HealthCheck, StepTimer, skipped
from ahvbackup.core.log import get_logger

from .client import Cluster, Prism, connect_prism
from .client.detect import discover_v4
from .client.http import V3
from .client.v4 import PrismV4
from .client.v4_models import cluster_from_v4

if TYPE_CHECKING:
    from .driver import AhvHypervisor

log = get_logger("health")

TITLES = {
    "tls": "Prism Central TLS reachability",
    "auth": "authentication",
    "clusters": "cluster enumeration",
    "rbac": "RBAC role confirmation",
    "iscsi": "DSIP discovery and iSCSI probe",
}
#: a TCP connect to the iSCSI portal gives up after this long (the auto data path waits 3 s)
ISCSI_CONNECT_TIMEOUT = 3.0
_PROBE_IQN = "iqn.2024-01.org.ahvbackup:health-check"


# permissions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Needed:
    """One permission ahvbackup needs: `operation` on entities of `kind` (v3 permission
    resources), what for (`purpose`: backup or restore) and the calls that need it.
    `data_path` limits it to one data path (None: every job)."""

    operation: str
    kind: str
    purpose: str
    calls: str
    data_path: str | None = None

    @property
    def label(self) -> str:
        return f"{self.operation} {self.kind}"


BACKUP_RESTORE_PERMISSIONS: tuple[Needed, ...] = (
    Needed("view", "cluster", "backup", "POST /clusters/list, GET /clusters/{uuid}"),
    Needed("view", "vm", "backup", "POST /vms/list, GET /vms/{uuid}"),
    Needed("view", "task", "backup", "GET /tasks/{uuid}"),
    Needed("create", "vm_snapshot", "backup", "POST /vm_snapshots (Prism Element)"),
    Needed("view", "vm_snapshot", "backup",
           "GET /vm_snapshots/{uuid}, POST /data/changed_regions (Prism Element)"),
    Needed("delete", "vm_snapshot", "backup", "DELETE /vm_snapshots/{uuid} (Prism Element)"),
    Needed("create", "image", "backup", "POST /images (a clone of a snapshot disk)", "rest"),
    Needed("view", "image", "backup", "GET /images/{uuid}, GET /images/{uuid}/file", "rest"),
    Needed("delete", "image", "backup", "DELETE /images/{uuid}", "rest"),
    Needed("create", "volume_group", "backup",
           "POST /volume_groups (v2.0, Prism Element)", "iscsi"),
    Needed("view", "volume_group", "backup", "GET /volume_groups/{uuid} (v2.0)", "iscsi"),
    Needed("update", "volume_group", "backup",
           "POST /volume_groups/{uuid}/open, /close (attach our initiator)", "iscsi"),
    Needed("delete", "volume_group", "backup", "DELETE /volume_groups/{uuid} (v2.0)", "iscsi"),
    Needed("create", "idempotence_identifier", "restore",
           "POST /idempotence_identifiers (the new VM's uuid, recorded first)"),
    Needed("create", "vm", "restore", "POST /vms (restore to AHV)"),
    Needed("update", "vm", "restore", "PUT /vms/{uuid} (attach disks, power on)"),
    Needed("delete", "vm", "restore", "DELETE /vms/{uuid} (a failed restore is removed)"),
    Needed("view", "subnet", "restore", "POST /subnets/list (NIC mapping)"),
    Needed("view", "storage_container", "restore",
           "GET /storage_containers (v2.0, Prism Element: where disks go)"),
    Needed("create", "volume_group", "restore",
           "POST /volume_groups (v2.0: an empty disk written over iSCSI)", "iscsi"),
    Needed("update", "volume_group", "restore", "POST /volume_groups/{uuid}/open, /close",
           "iscsi"),
    Needed("delete", "volume_group", "restore", "DELETE /volume_groups/{uuid}", "iscsi"),
    Needed("create", "image", "restore", "POST /images (an image to upload a disk into)",
           "rest"),
    Needed("update", "image", "restore", "PUT /images/{uuid}/file (the disk's bytes)", "rest"),
    Needed("delete", "image", "restore", "DELETE /images/{uuid}", "rest"),
)


def needed_permissions(data_path: str) -> list[Needed]:
    """What a backup over `data_path` and a restore need (auto: both data paths), one entry
    per permission (purposes joined: ``backup, restore``)."""
    uses = {"rest", "iscsi"} if data_path not in ("rest", "iscsi") else {data_path}
    merged: dict[tuple[str, str], Needed] = {}
    for n in BACKUP_RESTORE_PERMISSIONS:
        if n.data_path is not None and n.data_path not in uses:
            continue
        key = (n.operation, n.kind)
        if key in merged:
            prev = merged[key]
            n = Needed(n.operation, n.kind, f"{prev.purpose}, {n.purpose}",
                       f"{prev.calls}; {n.purpose}: {n.calls}", prev.data_path)
        else:
            n = Needed(n.operation, n.kind, n.purpose, f"{n.purpose}: {n.calls}", n.data_path)
        merged[key] = n
    return list(merged.values())


@dataclass(frozen=True)
class CallerRoles:
    """What the caller holds: role names and the (operation, kind) pairs they grant."""

    roles: tuple[str, ...]
    granted: frozenset[tuple[str, str]]
    source: str  # the calls it was read from
    #: the projects (name or, when unnamed, UUID) the policies are scoped to; empty: every
    #: entity (a policy without a PROJECT scope covers everything)
    projects: tuple[str, ...] = ()
    project_uuids: tuple[str, ...] = ()

    def scope_text(self) -> str:
        return f"projects {', '.join(self.projects)}" if self.projects else "every entity"


# the API flavour -----------------------------------------------------------------------------


class _V3Api:
    """The v3 calls the checks make (Prism Central)."""

    version = "v3"

    def __init__(self, prism: Prism) -> None:
        self.prism = prism

    async def clusters(self) -> list[Cluster]:
        return await self.prism.pc.aos_clusters()

    async def caller_permissions(self) -> CallerRoles:
        """``GET /users/info``: the caller's access control policies, each with its role's
        permission uuids; ``POST /permissions/list``: what each uuid allows (operation, kind).

        UNVERIFIED against a real Prism Central: `/users/info` is marked x-internal in the
        official v3 Swagger; a role granted outside access control policies (a PE-local or
        legacy "User Admin") may not appear in it."""
        pc = self.prism.pc
        info = await pc.request_json("GET", V3 + "/users/info")
        acps = info.get("access_control_policy_list") if isinstance(info, Mapping) else None
        roles: list[str] = []
        wanted: set[str] = set()
        scoped: list[str] = []
        everything = False
        for acp in acps if isinstance(acps, list) else []:
            role = acp.get("role") if isinstance(acp, Mapping) else None
            if not isinstance(role, Mapping):
                continue
            found = _project_scope(acp)
            scoped += found
            everything = everything or not found
            if isinstance(role.get("name"), str):
                roles.append(role["name"])
            wanted.update(str(u) for u in role.get("permission_uuid_list") or [])
        granted: set[tuple[str, str]] = set()
        offset, page = 0, 500
        while wanted:
            data = await pc.request_json("POST", V3 + "/permissions/list",
                                         json={"kind": "permission", "offset": offset,
                                               "length": page})
            entities = data.get("entities") or [] if isinstance(data, Mapping) else []
            for e in entities:
                uid = (e.get("metadata") or {}).get("uuid")
                res = (e.get("spec") or {}).get("resources") or \
                    (e.get("status") or {}).get("resources") or {}
                if uid in wanted and res.get("operation") and res.get("kind"):
                    granted.add((str(res["operation"]).lower(), str(res["kind"]).lower()))
            total = (data.get("metadata") or {}).get("total_matches", 0)
            offset += len(entities)
            if not entities or offset >= int(total or 0):
                break
        projects = () if everything or not scoped else await self._project_names(scoped)
        return CallerRoles(tuple(dict.fromkeys(roles)), frozenset(granted),
                           "GET /users/info, POST /permissions/list", projects,
                           () if everything else tuple(dict.fromkeys(scoped)))

    async def _project_names(self, uuids: list[str]) -> tuple[str, ...]:
        """The names of the scope's projects (``POST /projects/list``); a UUID stays as it is
        where the list does not name it."""
        try:
            data = await self.prism.pc.request_json("POST", V3 + "/projects/list",
                                                    json={"kind": "project", "length": 500})
        except ApiError:
            data = {}
        names = {str((e.get("metadata") or {}).get("uuid")): str((e.get("spec") or {})
                                                                   .get("name") or "")
                 for e in (data.get("entities") or [] if isinstance(data, Mapping) else [])}
        return tuple(dict.fromkeys(names.get(u) or u for u in uuids))


def _project_scope(acp: Mapping[str, Any]) -> list[str]:
    """The project UUIDs of a policy's ``PROJECT IN [...]`` scope (none: not scoped)."""
    out: list[str] = []
    contexts = ((acp.get("filter_list") or {}).get("context_list")) or []
    for ctx in contexts if isinstance(contexts, list) else []:
        for expr in (ctx.get("scope_filter_expression_list") or []
                     if isinstance(ctx, Mapping) else []):
            if isinstance(expr, Mapping) and expr.get("left_hand_side") == "PROJECT":
                rhs = expr.get("right_hand_side") or {}
                out += [str(u) for u in (rhs.get("uuid_list") or [])]
    return out


class _V4Api(_V3Api):
    """Clusters through clustermgmt v4 (DSIP: `network.externalDataServiceIp`). The caller's
    permissions are still read the v3 way: the v4 IAM namespace is not among those ahvbackup
    uses (UNVERIFIED that a real PC 2024.3 grants both from the same roles)."""

    version = "v4"

    def __init__(self, prism: Prism, v4: PrismV4) -> None:
        super().__init__(prism)
        self.v4 = v4

    async def clusters(self) -> list[Cluster]:
        items = await self.v4.list_all("clustermgmt", "config/clusters")
        found = [cluster_from_v4(c, endpoint="GET clustermgmt config/clusters") for c in items]
        return [c for c in found if not c.is_prism_central]


async def _api_for(prism: Prism, version: str) -> _V3Api:
    """`v3`; `v4` (a Prism without v4 is a configuration error, in one line); `auto`: v4
    when version discovery lists every namespace a job uses, else v3."""
    if version == "v3":
        return _V3Api(prism)
    found = await discover_v4(prism.pc)
    if found.usable:
        return _V4Api(prism, PrismV4(prism.pc, found.versions))
    if version == "v4":
        raise ConfigError(f"prism_api_version=v4: {found.reason}; set prism_api_version=v3 "
                          "or auto")
    return _V3Api(prism)


# helpers -------------------------------------------------------------------------------------


def _fail(step: str, seconds: float, detail: str, hint: str, *,
          code: ExitCode = ExitCode.UNAVAILABLE, data: Mapping[str, Any] | None = None,
          ) -> HealthCheck:
    return HealthCheck(step, TITLES[step], FAIL, seconds, detail=detail, hint=hint,
                       exit_code=code, data=dict(data or {}))


def _ok(step: str, seconds: float, detail: str, *, status: str = OK, hint: str = "",
        data: Mapping[str, Any] | None = None) -> HealthCheck:
    return HealthCheck(step, TITLES[step], status, seconds, detail=detail, hint=hint,
                       exit_code=ExitCode.OK, data=dict(data or {}))


def _why(err: OSError) -> str:
    """The reason of a failed connect: trio's "all attempts ... failed" names none itself."""
    cause = err.__cause__
    causes = list(cause.exceptions) if isinstance(cause, BaseExceptionGroup) else [cause]
    for one in causes:
        if isinstance(one, OSError) and one.strerror:
            return one.strerror.lower()
    return err.strerror or str(err)


def _split_pc(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1]
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]:")
    else:
        host, _, port = rest.rpartition(":")
    return host, int(port)


def _cert_details(der: bytes) -> dict[str, Any]:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    try:
        san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        sans = [str(v) for v in san_ext.value.get_values_for_type(x509.DNSName)]
        sans += [str(v) for v in san_ext.value.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        sans = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "subject_alt_names": sans,
        "self_signed": cert.subject == cert.issuer,
        "sha256": hashlib.sha256(der).hexdigest(),
    }


def _bundle_details(verify: bool | str) -> dict[str, Any]:
    if verify is False:
        return {"ca_bundle": None, "verification": "off (prism_insecure=yes)"}
    if verify is True:
        paths = ssl.get_default_verify_paths()
        return {"ca_bundle": paths.cafile or paths.capath or "(system default)",
                "verification": "system CAs (prism_ca_cert not set)"}
    out: dict[str, Any] = {"ca_bundle": verify, "verification": "prism_ca_cert"}
    try:
        from cryptography import x509

        certs = x509.load_pem_x509_certificates(Path(verify).read_bytes())
        out["ca_subjects"] = [c.subject.rfc4514_string() for c in certs]
        out["ca_not_after"] = [c.not_valid_after_utc.isoformat() for c in certs]
    except (OSError, ValueError) as err:
        out["ca_subjects"] = []
        out["ca_error"] = str(err)
    return out


def _context(verify: bool | str) -> ssl.SSLContext:
    if verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"prism_ca_cert: cannot load CA bundle {verify} "
                          f"({getattr(err, 'strerror', None) or err})") from err


async def _handshake(host: str, port: int, ctx: ssl.SSLContext, timeout: float,
                     ) -> tuple[bytes | None, str, str]:
    """Connect and shake hands; returns (peer certificate DER, TLS version, cipher)."""
    with trio.fail_after(timeout):
        tcp = await trio.open_tcp_stream(host, port)
        stream = trio.SSLStream(tcp, ctx, server_hostname=host)
        try:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as err:  # trio wraps the ssl module's error
                cause = err.__cause__
                if isinstance(cause, ssl.SSLError | OSError):
                    raise cause from None
                raise OSError(f"connection lost during the TLS handshake ({err})") from err
            der = stream.getpeercert(binary_form=True)
            cipher = stream.cipher()
            return der, str(stream.version()), cipher[0] if cipher else ""
        finally:
            await trio.aclose_forcefully(stream)


def _tls_hint(reason: str, cert: Mapping[str, Any], verify: bool | str) -> str:
    now = dt.datetime.now(dt.UTC).isoformat()
    if cert and cert.get("not_after", "9999") < now:
        return (f"Prism's certificate expired on {cert['not_after']}: renew it in Prism "
                "(Settings > SSL Certificate)")
    if cert and cert.get("not_before", "") > now:
        return (f"Prism's certificate is valid only from {cert['not_before']}: check this "
                "host's clock")
    if "mismatch" in reason.lower():
        names = ", ".join(cert.get("subject_alt_names") or []) or "none"
        return ("prism_central= must be a name or address the certificate carries "
                f"(its subject alternative names: {names})")
    issuer = cert.get("issuer", "the CA that signed Prism's certificate") if cert else \
        "the CA that signed Prism's certificate"
    where = f"prism_ca_cert ({verify})" if isinstance(verify, str) else "prism_ca_cert"
    return (f"set {where} to a PEM bundle holding the CA {issuer}; prism_insecure=yes skips "
            "verification (a lab only)")


# the steps -----------------------------------------------------------------------------------


async def _check_tls(pc_url: str, verify: bool | str, timeout: float) -> HealthCheck:
    host, port = _split_pc(pc_url)
    where = f"{host}:{port}"
    with StepTimer() as t:
        try:
            ctx = _context(verify)
        except ConfigError as err:
            return _fail("tls", t.elapsed, str(err),
                         "point prism_ca_cert at a readable PEM file of CA certificates",
                         code=ExitCode.CONFIG, data=_bundle_details(verify))
        try:
            der, version, cipher = await _handshake(host, port, ctx, timeout)
        except trio.TooSlowError:
            return _fail("tls", t.elapsed, f"{where}: no answer within {timeout:g} s",
                         f"check prism_central={where} and that this host may reach it "
                         "(firewall, routing)", data={"host": host, "port": port})
        except ssl.SSLError as err:
            reason = (err.verify_message if isinstance(err, ssl.SSLCertVerificationError)
                      else None) or err.reason or str(err)
            cert: dict[str, Any] = {}
            try:
                der2, _, _ = await _handshake(host, port, _context(False), timeout)
                cert = _cert_details(der2) if der2 else {}
            except (OSError, ssl.SSLError, trio.TooSlowError, ValueError) as inner:
                log.debug("health-check: no certificate from %s: %s", where, inner)
            verify_failed = isinstance(err, ssl.SSLCertVerificationError)
            what = "certificate verification failed" if verify_failed else "TLS failed"
            detail = [f"{where}: {what}: {reason}"]
            if cert:
                detail += [f"certificate subject: {cert['subject']}",
                           f"issuer: {cert['issuer']}",
                           f"valid: {cert['not_before']} to {cert['not_after']}",
                           f"subject alternative names: "
                           f"{', '.join(cert['subject_alt_names']) or 'none'}"]
            bundle = _bundle_details(verify)
            detail.append(f"checked against: {bundle['ca_bundle']} ({bundle['verification']})")
            if bundle.get("ca_subjects"):
                detail.append(f"which holds: {'; '.join(bundle['ca_subjects'])}")
            return _fail("tls", t.elapsed, "\n".join(detail), _tls_hint(reason, cert, verify),
                         data={"host": host, "port": port, "reason": reason,
                               "certificate": cert, **bundle})
        except OSError as err:
            return _fail("tls", t.elapsed,
                         f"{where}: cannot connect: {_why(err)}",
                         f"check prism_central={where} (host and port, 9440 by default) and "
                         "that this host may reach it (firewall, routing)",
                         data={"host": host, "port": port})
    cert = _cert_details(der) if der else {}
    bundle = _bundle_details(verify)
    data = {"host": host, "port": port, "tls_version": version, "cipher": cipher,
            "certificate": cert, **bundle}
    if verify is False:
        return _ok("tls", t.seconds, f"{where}: {version}, certificate NOT verified",
                   status=WARN, hint="prism_insecure=yes: set prism_ca_cert and turn it off "
                   "outside a lab", data=data)
    return _ok("tls", t.seconds,
               f"{where}: {version}, certificate verified ({cert.get('subject', '?')}, "
               f"valid until {cert.get('not_after', '?')})", data=data)


def _auth_hint(cfg: Any) -> str:
    where = f"the password in passfile {cfg.passfile}" if cfg.passfile else "password="
    return (f"check user= ({cfg.user}) and {where}; the account must exist in Prism "
            "(a local user or one of a directory Prism knows) and not be locked")


async def _check_auth(prism: Prism, cfg: Any, timeout: float) -> HealthCheck:
    with StepTimer() as t:
        try:
            with trio.fail_after(timeout):
                me = await prism.pc.me()
        except trio.TooSlowError:
            return _fail("auth", t.elapsed, f"GET /users/me: no answer within {timeout:g} s",
                         "Prism Central is slow or overloaded; try again")
        except ApiAuthError as err:
            return _fail("auth", t.elapsed, str(err), _auth_hint(cfg),
                         data={"user": cfg.user, "status": err.status})
        except ApiError as err:
            return _fail("auth", t.elapsed, str(err), "see the error; Prism answered "
                         "GET /users/me with an error", data={"user": cfg.user})
    return _ok("auth", t.seconds, f"logged in to {prism.pc.host} as {me.name!r}",
               data={"user": me.name, "uuid": me.uuid, "display_name": me.display_name})


async def _check_clusters(prism: Prism, api: _V3Api, cfg: Any, timeout: float,
                          ) -> tuple[HealthCheck, list[Cluster]]:
    with StepTimer() as t:
        try:
            with trio.fail_after(timeout):
                clusters = await api.clusters()
        except trio.TooSlowError:
            return _fail("clusters", t.elapsed, f"no cluster list within {timeout:g} s",
                         "Prism Central is slow or overloaded; try again"), []
        except ApiError as err:
            return _fail("clusters", t.elapsed, str(err),
                         "the user needs to view clusters (see the rbac step)"), []
        found = [{"name": c.name, "uuid": c.uuid, "external_ip": c.external_ip,
                  "dsip": c.dsip} for c in clusters]
        if not clusters:
            return _fail("clusters", t.elapsed, f"Prism Central at {prism.pc.host} lists no "
                         "AOS cluster", "register the cluster with this Prism Central",
                         data={"clusters": found}), []
        selected = clusters
        if cfg.cluster:
            want = str(cfg.cluster)
            selected = [c for c in clusters if want in (c.name, c.uuid)]
            if not selected:
                names = ", ".join(f"{c.name} ({c.uuid})" for c in clusters)
                return _fail("clusters", t.elapsed,
                             f"cluster={want}: no cluster of that name or uuid",
                             f"set cluster= to one of: {names}", code=ExitCode.CONFIG,
                             data={"clusters": found, "cluster": want}), []
        unreachable = []
        for c in selected:
            try:
                with trio.fail_after(timeout):
                    pe = await prism.pe(c.uuid)
                    await pe.me()
            except (ApiError, trio.TooSlowError) as err:
                why = str(err) if isinstance(err, ApiError) else f"no answer in {timeout:g} s"
                unreachable.append(f"cluster {c.name}: Prism Element at "
                                   f"{c.external_ip or '?'}: {why}")
    data = {"clusters": found, "selected": [c.name for c in selected],
            "cluster": cfg.cluster or None}
    if unreachable:
        return _fail("clusters", t.seconds, "\n".join(unreachable),
                     "backup snapshots and change tracking are served by each cluster's Prism "
                     "Element at its external IP on the Prism port: let this host reach it, "
                     "with the same user and CA", data=data), selected
    how = f"cluster={cfg.cluster} resolved to" if cfg.cluster else "all clusters:"
    listed = ", ".join(f"{c.name} ({c.uuid}, PE {c.external_ip})" for c in selected)
    return _ok("clusters", t.seconds, f"{len(clusters)} AOS cluster(s); {how} {listed}; "
               "Prism Element reached", data=data), selected


async def _check_rbac(api: _V3Api, cfg: Any, user: str, timeout: float) -> HealthCheck:
    needed = needed_permissions(str(cfg.data_path))
    with StepTimer() as t:
        try:
            with trio.fail_after(timeout):
                caller = await api.caller_permissions()
        except trio.TooSlowError:
            return _fail("rbac", t.elapsed, f"no answer within {timeout:g} s",
                         "Prism Central is slow or overloaded; try again")
        except ApiNotFoundError as err:
            return _ok("rbac", t.elapsed, f"the caller's roles cannot be read here ({err})",
                       status=WARN, hint="permissions are not confirmed: this Prism does not "
                       "serve GET /users/info; check the roles in Prism's IAM by hand")
        except ApiError as err:
            return _fail("rbac", t.elapsed, f"the caller's roles cannot be read: {err}",
                         f"let {user!r} view its own access control policies and the "
                         "permission list, or check its roles in Prism's IAM by hand")
    if not caller.roles and not caller.granted:
        return _ok("rbac", t.seconds, f"no access control policy of {user!r} is visible "
                   f"({caller.source}): permissions not confirmed", status=WARN,
                   hint="a built-in administrator has no policy (and may do everything); any "
                   "other user needs a role: check its role assignments in Prism Central's IAM",
                   data={"user": user, "roles": [], "read_from": caller.source,
                         "api": api.version, "permissions": []})
    rows = []
    missing: list[Needed] = []
    for n in needed:
        granted = (n.operation, n.kind) in caller.granted
        rows.append({"permission": n.label, "operation": n.operation, "kind": n.kind,
                     "needed_for": n.purpose.split(", "), "calls": n.calls,
                     "granted": granted})
        if not granted:
            missing.append(n)
    roles = ", ".join(caller.roles) or "none"
    data = {"user": user, "roles": list(caller.roles), "read_from": caller.source,
            "api": api.version, "data_path": str(cfg.data_path), "permissions": rows,
            "scope": {"projects": list(caller.projects)}}
    roles = f"{roles}; scope: {caller.scope_text()}"
    outside = [p for p in cfg.project if caller.projects
               and p not in (*caller.projects, *caller.project_uuids)]
    if outside:
        return _fail("rbac", t.seconds, f"user {user!r} (roles: {roles}) is not scoped to "
                     f"project {', '.join(outside)} that project= names",
                     f"assign {user!r} a role on that project in Prism Central's IAM, or "
                     "name only its own projects in project=", data=data)
    for_backup = [n for n in missing if "backup" in n.purpose.split(", ")]
    if missing and not for_backup and str(cfg.target) != "ahv":
        # backups and restores to files work; only a restore to AHV would be refused
        lines = [f"user {user!r} (roles: {roles}) may back up and restore to files; a restore "
                 f"to AHV (target=ahv) would also need {len(missing)} permission(s):"]
        lines += [f"missing: {n.label} ({n.calls})" for n in missing]
        return _ok("rbac", t.seconds, "\n".join(lines), status=WARN,
                   hint=f"for restores to AHV, give {user!r} a VM admin role as well",
                   data=data)
    if missing:
        lines = [f"user {user!r} (roles: {roles}) lacks {len(missing)} of {len(needed)} "
                 "permission(s):"]
        lines += [f"missing: {n.label} ({n.calls})" for n in missing]
        purposes = sorted({p for n in missing for p in n.purpose.split(", ")})
        return _fail("rbac", t.seconds, "\n".join(lines),
                     f"give {user!r} a role granting the missing permission(s) in Prism "
                     f"Central's IAM (needed for {' and '.join(purposes)}): for example "
                     "Backup Admin for snapshots and volume groups, and a VM admin role for "
                     "restores to AHV", data=data)
    return _ok("rbac", t.seconds, f"user {user!r} (roles: {roles}) holds all {len(needed)} "
               f"permissions a backup (data_path={cfg.data_path}) and a restore need",
               data=data)


def _probe_iqn(cfg: Any) -> str:
    """The IQN jobs use when known without side effects (configured, the host's, or stored in
    state_dir), else a name of the health-check's own: discovery needs no attachment."""
    from ahvbackup.transports.iscsi.datapath import initiator_iqn

    value = str(cfg.iscsi_initiator or "auto")
    if value != "auto":
        return initiator_iqn(cfg)  # validates; no state is written for a configured name
    try:
        for line in Path("/etc/iscsi/initiatorname.iscsi").read_text().splitlines():
            key, _, name = line.strip().partition("=")
            if key == "InitiatorName" and name.strip().startswith("iqn."):
                return name.strip()
    except OSError:
        pass
    try:
        name = (Path(cfg.state_dir) / "iscsi_initiator").read_text().strip()
        if name.startswith("iqn."):
            return name
    except OSError:
        pass
    return _PROBE_IQN


async def _probe_portal(portal: tuple[str, int], iqn: str, timeout: float) -> dict[str, Any]:
    from ahvbackup.transports.iscsi.initiator import discover

    host, port = portal
    t0 = trio.current_time()
    with trio.fail_after(min(timeout, ISCSI_CONNECT_TIMEOUT)):
        tcp = await trio.open_tcp_stream(host, port)
    await tcp.aclose()
    connect_ms = (trio.current_time() - t0) * 1000
    targets = await discover(portal, initiator_iqn=iqn, timeout=timeout)
    return {"portal": f"{host}:{port}", "tcp_connect_ms": round(connect_ms, 1),
            "send_targets": "answered", "targets_offered": len(targets), "initiator": iqn}


async def _check_iscsi(prism: Prism, cfg: Any, clusters: Sequence[Cluster],
                       timeout: float) -> HealthCheck:
    data_path = str(cfg.data_path)
    if data_path == "rest":
        return skipped("iscsi", TITLES["iscsi"], "data_path=rest reads disks over HTTPS; "
                       "iSCSI is not used")
    # with data_path=auto a job falls back to REST: a failure here is a warning
    fatal = data_path == "iscsi"
    port = int((cfg.extra or {}).get("iscsi_port", 3260))
    portals: list[dict[str, Any]] = []
    problems: list[str] = []
    hint = ""
    code = ExitCode.UNAVAILABLE
    with StepTimer() as t:
        try:
            iqn = _probe_iqn(cfg)
        except DataPathError as err:
            return _fail("iscsi", t.elapsed, str(err), "set iscsi_initiator= to an iqn. name "
                         "or auto", code=ExitCode.CONFIG)
        for c in clusters:
            dsip = str(cfg.dsip) if cfg.dsip else c.dsip
            source = "dsip=" if cfg.dsip else "Prism (external_data_services_ip)"
            if not dsip:
                problems.append(f"cluster {c.name}: no data services IP (Prism reports none "
                                "and dsip= is not set)")
                hint = ("set the cluster's Data Services IP in Prism (Cluster Details), or "
                        "dsip= here, or use data_path=rest")
                code = ExitCode.CONFIG
                continue
            try:
                row = await _probe_portal((dsip, port), iqn, timeout)
            except trio.TooSlowError:
                problems.append(f"cluster {c.name}: {dsip}:{port} (from {source}): no TCP "
                                f"answer within {ISCSI_CONNECT_TIMEOUT:g} s")
                hint = hint or (f"let this host reach {dsip} on TCP {port} (firewall, "
                                "routing, a data network), check dsip=, or use data_path=rest")
                continue
            except OSError as err:
                problems.append(f"cluster {c.name}: {dsip}:{port} (from {source}): cannot "
                                f"connect: {_why(err)}")
                hint = hint or (f"nothing answers iSCSI at {dsip}:{port}: check dsip= and "
                                "iscsi_port=, the cluster's Data Services IP and the "
                                "firewall; or use data_path=rest")
                continue
            except AhvBackupError as err:
                problems.append(f"cluster {c.name}: {dsip}:{port}: TCP connects but "
                                f"SendTargets discovery failed: {err}")
                hint = hint or ("something answers on the portal but refuses discovery: "
                                "check that it is the cluster's DSIP and that this "
                                "initiator may discover there")
                continue
            row.update(cluster=c.name, dsip_source=source)
            portals.append(row)
    data = {"data_path": data_path, "portals": portals, "initiator": iqn}
    if problems:
        if not fatal:
            return _ok("iscsi", t.seconds, "\n".join(problems), status=WARN,
                       hint=f"{hint} (data_path=auto reads over REST meanwhile)", data=data)
        return _fail("iscsi", t.seconds, "\n".join(problems), hint, code=code, data=data)
    listed = "; ".join(f"{p['cluster']}: {p['portal']} (TCP {p['tcp_connect_ms']} ms, "
                       f"SendTargets answered, {p['targets_offered']} target(s) offered)"
                       for p in portals)
    return _ok("iscsi", t.seconds, listed, data=data)


async def run_health_checks(driver: AhvHypervisor, *, timeout: float = 10.0,
                            ) -> list[HealthCheck]:
    """Steps 1 to 5; a step whose prerequisite failed is skipped, saying which."""
    cfg = driver.config
    pc_url = driver._pc_url()
    verify = driver._verify()
    out = [await _check_tls(pc_url, verify, timeout)]
    if out[0].failed:
        why = "Prism Central's TLS endpoint is not usable (step tls)"
        return [*out, *(skipped(s, TITLES[s], why) for s in ("auth", "clusters", "rbac",
                                                             "iscsi"))]
    if not cfg.user or not cfg.password:
        raise ConfigError("user and password (or passfile): required to reach Prism")
    try:
        async with connect_prism(
            pc_url, user=cfg.user, password=cfg.password, verify=verify, rate_rpm=0,
            retry_budget=min(3.0, timeout), max_attempts=2, timeout=timeout,
        ) as prism:
            out.append(await _check_auth(prism, cfg, timeout))
            if out[-1].failed:
                why = "not logged in (step auth)"
                return [*out, *(skipped(s, TITLES[s], why) for s in ("clusters", "rbac",
                                                                     "iscsi"))]
            api = await _api_for(prism, str(cfg.prism_api_version))
            clusters_check, clusters = await _check_clusters(prism, api, cfg, timeout)
            out.append(clusters_check)
            out.append(await _check_rbac(api, cfg, str(cfg.user), timeout))
            if not clusters:
                out.append(skipped("iscsi", TITLES["iscsi"],
                                   "no cluster to probe (step clusters)"))
            else:
                out.append(await _check_iscsi(prism, cfg, clusters, timeout))
    except ApiError as err:  # each step handles its own; this is the client being made
        out.append(_fail("auth", 0.0, str(err), _auth_hint(cfg)))
    done = {c.step for c in out}
    out += [skipped(s, TITLES[s], f"not run: step {out[-1].step} failed")
            for s in TITLES if s not in done]
    return out
