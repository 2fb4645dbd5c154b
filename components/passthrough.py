from kfp import dsl

from synthvlm.images import image_for


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def same_manifest(manifest: str) -> str:
    """The other branch of an optional step: hands its input manifest on unchanged."""
    return manifest
