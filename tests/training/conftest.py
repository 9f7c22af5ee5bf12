"""Training tests use the shared helpers (re-exported here for older imports)."""

from tests.helpers import (  # noqa: F401
    REPO,
    experiment,
    lm_command,
    lm_env,
    prepare_tiny_data,
    read_samples,
    run_lm,
)
