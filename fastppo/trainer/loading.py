"""A pretrained backbone under a new head (the critic's value head on the policy's checkpoint):
one line says what is new, instead of transformers' multi-line load report.

transformers 5.x logs a "LOAD REPORT" table (the missing keys of the new head, MISSING) as a
warning of its ``transformers.modeling_utils`` logger; 4.x logs "Some weights of ... were not
initialized". Both are dropped by a filter on that logger while the model loads; everything else
it logs, and the errors it raises (mismatched shapes, conversion errors), are left as they are.
"""

import contextlib
import logging
import warnings

#: The logger transformers' ``from_pretrained`` reports missing and unexpected keys on.
REPORT_LOGGER = "transformers.modeling_utils"


def is_load_report(record: logging.LogRecord) -> bool:
    """Whether ``record`` is transformers' report of missing or unexpected keys (5.x or 4.x)."""
    message = record.getMessage()
    return "LOAD REPORT" in message or message.startswith(("Some weights of", "Some weights were"))


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_load_report(record)


@contextlib.contextmanager
def no_load_report():
    """Within the block, transformers' load report of missing/unexpected keys is not printed."""
    logger, dropped = logging.getLogger(REPORT_LOGGER), _DropLoadReport()
    logger.addFilter(dropped)
    try:
        yield
    finally:
        logger.removeFilter(dropped)


def from_pretrained_with_new_head(cls, path: str, what: str, log=print, head: str = "value head", **kwargs):
    """``cls.from_pretrained(path, **kwargs)`` for a checkpoint that may lack ``cls``'s head (a causal
    LM's folder loaded as a token classifier): the new head's parameters are said in one line, e.g.
    "critic: a new value head (score.bias, score.weight) on gpt2's backbone". Backbone weights
    missing from the checkpoint (a real problem: they would be random) are one warning."""
    with no_load_report():
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    prefix = model.base_model_prefix
    missing = sorted(info["missing_keys"])
    backbone = [key for key in missing if key.split(".")[0] == prefix]
    new = [key for key in missing if key not in backbone]
    if new:
        log(f"{what}: a new {head} ({', '.join(new)}) on {path}'s backbone")
    if backbone:
        listed = ", ".join(backbone[:3]) + (f" and {len(backbone) - 3} more" if len(backbone) > 3 else "")
        warnings.warn(f"{what}: {path} lacks backbone weights, left random: {listed}", stacklevel=2)
    return model
