"""Progress bars of the libraries the suite loads models with.

transformers and diffusers draw their own bars while they load weights. ``--no-progress``
hides the suite's bars, and ``library_progress_bars(False)`` hides theirs too.
"""

from __future__ import annotations


def library_progress_bars(enabled: bool) -> None:
    """Show or hide the weight-loading progress bars of transformers and diffusers in this process."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for module in (transformers_logging, diffusers_logging):
        if enabled:
            module.enable_progress_bar()
        else:
            module.disable_progress_bar()
