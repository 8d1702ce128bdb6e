"""Progress bars for long computations, through tqdm.

One bar per task (an optimization, a profile), written to stderr. A bar is made only
when it will be shown, so a task run without one pays nothing: no tqdm object, no
clock reads, one ``is None`` test per step in the caller.

``enabled`` means:

- ``True``: show the bar (the caller asked for it), wherever the output goes;
- ``False``: never;
- ``None``: show it only in an interactive session (stderr is a terminal, or an
  IPython kernel is running), and only once the task has lasted ``delay`` seconds.
  Scripts, logs, CI and pytest (which captures stderr) stay quiet.
"""
import sys

__all__ = ["interactive", "progress_bar"]


def interactive():
    """Whether progress output would reach a person: stderr is a terminal, or the code
    runs in a Jupyter/IPython kernel (whose stderr is not a terminal but is shown)."""
    if "ipykernel" in sys.modules:
        return True
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):     # a closed or replaced stream
        return False


def progress_bar(enabled, *, total=None, desc=None, unit="it", delay=0.0, leave=True,
                 bar_format=None):
    """A tqdm bar on stderr, or None when no bar is to be shown.

    Parameters
    ----------
    enabled : bool or None
        True (show), False (never), None (only when :func:`interactive`; then the
        bar appears after ``delay`` seconds, or after 0.5 s when ``delay`` is 0).
    total : int, optional
        The number of steps, when known (None: a counter without a bar).
    desc, unit, leave, bar_format
        Passed to tqdm; ``bar_format`` may also use ``{ms_per_it}``.
    delay : float
        Seconds before the bar first appears (tqdm's ``delay``).

    Returns
    -------
    tqdm.tqdm or None
    """
    if enabled is None:
        if not interactive():
            return None
        delay = delay or 0.5
    elif not enabled:
        return None
    return _bar_class()(total=total, desc=desc, unit=unit, file=sys.stderr, leave=leave,
                        delay=delay, dynamic_ncols=True, mininterval=0.1, bar_format=bar_format)


_BAR = None


def _bar_class():
    """tqdm with one more field for ``bar_format``: ``{ms_per_it}``, milliseconds per
    step (MixedModels.jl's 'ms/it'). Made on first use, so that importing this module
    does not import tqdm."""
    global _BAR
    if _BAR is None:
        from tqdm import tqdm

        class Bar(tqdm):
            @property
            def format_dict(self):
                d = super().format_dict
                n = d.get("n") or 0
                d["ms_per_it"] = 1000.0 * d.get("elapsed", 0.0) / n if n else 0.0
                return d

        _BAR = Bar
    return _BAR
