"""`prism_api_version`: which `PrismApi` a session speaks, decided once at connect.

- `v3`: v3, as before v4 existed.
- `v4`: v4, or one clear line when Prism does not serve it.
- `auto` (the default): v4 when version discovery lists every namespace a backup uses and the
  disks are read over iSCSI only (`data_path=iscsi`); else v3, whose REST read is one image
  per disk where v4's is a VM clone (which needs a user that may create VMs) and an image:
  with `data_path=auto` any disk the portal does not offer falls back to REST. The choice
  and the reason are logged.
"""

from __future__ import annotations

__all__ = ["ApiChoice", "pick_api"]

import logging
from dataclasses import dataclass
from typing import Any

from ahvbackup.core.errors import ApiError, ConfigError

from .api_v3 import V3Api
from .api_v4 import V4Api
from .client import Prism
from .client.api import PrismApi
from .client.detect import discover_v4
from .client.v4 import PrismV4

log = logging.getLogger("ahvbackup.ahv")

@dataclass(frozen=True)
class ApiChoice:
    api: PrismApi
    v3: V3Api
    reason: str


async def pick_api(prism: Prism, config: Any) -> ApiChoice:
    wanted = str(config.prism_api_version)
    data_path = str(config.data_path)
    v3 = V3Api(prism)
    if wanted == "v3":
        return ApiChoice(v3, v3, "prism_api_version=v3")
    if wanted == "auto" and data_path == "rest":
        return ApiChoice(v3, v3, "prism_api_version=auto: data_path=rest, which v3 reads "
                                 "through one image per disk (v4 would need a VM clone too)")
    try:
        found = await discover_v4(prism.pc)
    except ApiError as err:
        if wanted == "v4":
            raise ConfigError(f"prism_api_version=v4: version discovery failed ({err})") from err
        return ApiChoice(v3, v3, f"prism_api_version=auto: v4 version discovery failed "
                                 f"({err}); using v3")
    if not found.usable:
        if wanted == "v4":
            raise ConfigError(f"prism_api_version=v4: {found.reason}; set "
                              "prism_api_version=v3 or auto")
        return ApiChoice(v3, v3, f"prism_api_version=auto: {found.reason}; using v3")
    v4 = V4Api(prism, PrismV4(prism.pc, found.versions), v3)
    listed = ", ".join(f"{ns} {v}" for ns, v in sorted(found.versions.items())
                       if ns in ("vmm", "dataprotection", "volumes"))
    if wanted == "auto" and data_path != "iscsi":
        # data_path=auto falls back to REST for any disk the portal does not offer (an ACL, a
        # DSIP that answers but is not the cluster's): v4 reads those only through a VM
        # clone, which a backup user may not make; v3 reads them with a backup user's rights
        return ApiChoice(v3, v3, f"prism_api_version=auto: v4 found ({listed}), but "
                                 f"data_path={data_path} may read disks over REST, which v4 does "
                                 "only through a VM clone (a user that may create VMs); using "
                                 "v3 (data_path=iscsi or prism_api_version=v4 uses v4)")
    return ApiChoice(v4, v3, f"prism_api_version={wanted}: {found.source} lists {listed}")
