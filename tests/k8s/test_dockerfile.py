"""The image's Dockerfile, linted offline (no docker on CI): what it copies exists and is not dockerignored,
base images are pinned, it runs as a numeric non-root UID, and it bakes no secret into its layers."""

from __future__ import annotations

import k8s_checks as checks


def test_dockerfile_passes_the_checks() -> None:
    problems = checks.dockerfile_problems(checks.DOCKERFILE.read_text())
    assert problems == [], "\n".join(["", *problems])


def test_pods_of_the_image_run_as_its_uid() -> None:
    """The pods say runAsUser; the image must be built for the same UID (k8s_checks.run_as_user_problems)."""
    dockerfile = checks.DOCKERFILE.read_text()
    problems = [p for d in checks.kustomizations() for p in checks.run_as_user_problems(dockerfile, checks.render(d))]
    assert problems == [], "\n".join(["", *problems])
