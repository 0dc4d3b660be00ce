"""SAM 3D Objects' reconstruction pipeline, loaded as its own entry point
(``notebook/inference.py``, class ``Inference``) loads it, with geomgen's
stricter allow-list, and run on one image plus mask.

The pipeline is described by ``pipeline.yaml`` (shipped with the gated
weights): OmegaConf loads it, geomgen sets ``rendering_engine``,
``compile_model`` and ``workspace_dir`` (the yaml's folder, absolute, which
the config's relative checkpoint paths hang from), checks every ``_target_``
against ``ALLOWED_TARGET_PREFIXES``, and ``hydra.utils.instantiate`` builds the
pipeline (an ``InferencePipelinePointMap``). A config can name any importable
callable, so nothing outside the allow-list is ever imported or called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geomgen.errors import BackendUnavailable

# What SAM 3D Objects' pipeline.yaml instantiates: its own classes, MoGe (the
# depth model) and torchvision's transforms. Narrower than the upstream
# entry point's (which allows all of torch, torch.load included).
ALLOWED_TARGET_PREFIXES: list[str] = ["sam3d_objects.", "moge.", "torchvision.transforms."]
RENDERING_ENGINE = "nvdiffrast"  # the old server's choice (the upstream notebook uses pytorch3d)
# Packages the real pipeline imports besides its own; none is on PyPI in a
# usable form (utils3d on PyPI is an unrelated package).
SAM3D_OBJECTS_MODULES = ("sam3d_objects", "pytorch3d", "kaolin", "moge", "utils3d", "hydra")
SAM3D_OBJECTS_INSTALL = (
    "install SAM 3D Objects from its sources on a CUDA machine (git clone "
    "https://github.com/facebookresearch/sam-3d-objects, then its doc/setup.md: pytorch3d, kaolin, "
    "MoGe and utils3d from git, then pip install -e .); see docs/sam3d.md"
)
WEIGHTS_HINT = ("download the gated facebook/sam-3d-objects weights on a machine with access and give "
                "sam3d_checkpoint=/path/to/checkpoints/hf/pipeline.yaml")


@dataclass
class PipelineConfig:
    """A checked pipeline.yaml, ready to instantiate."""

    path: Path
    config: Any  # omegaconf.DictConfig
    targets: list[str]

    @property
    def needs_sam3d_objects(self) -> bool:
        return any(target.startswith("sam3d_objects.") for target in self.targets)


def read_config(path_text: str | None) -> PipelineConfig:
    """Load and check ``pipeline.yaml``. Raises BackendUnavailable for a missing
    or unreadable file and for a ``_target_`` outside the allow-list."""
    if not path_text:
        raise BackendUnavailable(f"no SAM 3D Objects pipeline given (option sam3d_checkpoint); {WEIGHTS_HINT}")
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise BackendUnavailable(f"the SAM 3D Objects pipeline {path} does not exist; {WEIGHTS_HINT}")
    from omegaconf import DictConfig, ListConfig, OmegaConf

    try:
        config = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax, not a mapping
        raise BackendUnavailable(f"cannot read {path} as a pipeline config ({type(exc).__name__}: "
                                 f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    if not isinstance(config, DictConfig) or "_target_" not in config:
        raise BackendUnavailable(f"{path} names no _target_ to build; is it SAM 3D Objects' pipeline.yaml?")
    # What the upstream entry point sets before instantiating.
    config.rendering_engine = RENDERING_ENGINE
    config.compile_model = False
    config.workspace_dir = str(path.parent)
    targets: list[str] = []
    pending: list[Any] = [config]
    while pending:
        node = pending.pop()
        if isinstance(node, DictConfig):
            pending.extend(node.values())
            if "_target_" in node:
                targets.append(str(node["_target_"]))
        elif isinstance(node, ListConfig):
            pending.extend(node)
    for target in targets:
        check_target(target, path)
    return PipelineConfig(path=path, config=config, targets=targets)


def check_target(target: str, source: Path | str = "the config") -> None:
    """Refuse a ``_target_`` outside the allow-list, before anything is imported."""
    if not any(target.startswith(prefix) for prefix in ALLOWED_TARGET_PREFIXES) or "__" in target:
        raise BackendUnavailable(
            f"{source} asks to build {target!r}, which is not allowed: a SAM 3D Objects pipeline config may "
            f"only build {', '.join(p + '*' for p in ALLOWED_TARGET_PREFIXES)}"
        )


def missing_modules(config: PipelineConfig) -> list[str]:
    """Modules the config's targets need that cannot be found here."""
    wanted: list[str] = []
    if config.needs_sam3d_objects:
        wanted += list(SAM3D_OBJECTS_MODULES)
    else:
        wanted.append("hydra")
    wanted += [target.split(".", 1)[0] for target in config.targets]
    from geomgen.backends._sam3_segmenter import module_exists

    return [name for name in dict.fromkeys(wanted) if not module_exists(name)]


def instantiate(config: PipelineConfig) -> Any:
    """Build the pipeline. The allow-list is checked again on each resolved
    callable: a dotted path under an allowed package that reaches something
    else (``sam3d_objects.x.os.system``) is refused."""
    from hydra.utils import get_object
    from hydra.utils import instantiate as hydra_instantiate

    for target in config.targets:
        resolved = get_object(target)
        where = f"{getattr(resolved, '__module__', None) or '?'}.{getattr(resolved, '__qualname__', '?')}"
        if not any(where.startswith(prefix) for prefix in ALLOWED_TARGET_PREFIXES):
            raise BackendUnavailable(
                f"{config.path} asks to build {target!r}, which resolves to {where}, outside the allowed packages")
    return hydra_instantiate(config.config)


def run_kwargs(texture: bool) -> dict[str, Any]:
    """The keyword arguments of ``pipeline.run`` besides image and mask: the
    old server's (mesh post-processing, UV texture baking) or, without
    texture, vertex colours. Layout post-processing is for placing the object
    in the photo's scene, which a single asset does not need."""
    return {
        "stage1_only": False,
        "with_mesh_postprocess": True,
        "with_texture_baking": texture,
        "with_layout_postprocess": False,
        "use_vertex_color": not texture,
        "pointmap": None,
    }
