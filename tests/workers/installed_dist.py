"""What this environment has installed of vllm-lora-resolvers, as one JSON object.

Where the package is imported from, where each distribution of that name lives, the plugins vLLM
would discover (``vllm.general_plugins`` entry points, all packages), and the requirements of ours
(base and the store extras its plugins need) that no installed version satisfies.
"""

from __future__ import annotations

import json
from importlib import metadata

from packaging.requirements import Requirement

import vllm_lora_resolvers
from vllm_lora_resolvers.stores import STORES

DISTRIBUTION = "vllm-lora-resolvers"
PLUGIN_EXTRAS = tuple(store.extra for store in STORES if store.extra is not None)


def unmet_requirements(distribution: metadata.Distribution) -> list[str]:
    unmet = []
    for line in distribution.requires or ():
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is not None and not any(marker.evaluate({"extra": e}) for e in PLUGIN_EXTRAS):
            continue
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{line} (not installed)")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(f"{line} (installed {installed})")
    return unmet


def main() -> None:
    distributions = list(metadata.distributions(name=DISTRIBUTION))
    print(
        json.dumps(
            {
                "module": vllm_lora_resolvers.__file__,
                "distributions": [str(d.locate_file("")) for d in distributions],
                "plugins": [e.name for e in metadata.entry_points(group="vllm.general_plugins")],
                "unmet": unmet_requirements(distributions[0]),
            }
        )
    )


if __name__ == "__main__":
    main()
