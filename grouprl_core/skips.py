"""Skipped optimizer steps: when to say so, and in which words (shared by the TRL and verl adapters).

GPG and GCPO-guidance skip a step that holds no learning signal. The rule for reporting it, with
``k`` the number of skipped steps so far and ``r`` the run of consecutive skips ending at this step:

    warn when  k == 1                  (the first skipped step of the run)
          or   k > 1 and r % every == 0 (every ``every``-th skip in a row)
    a step that is not skipped resets r to 0; at the end, one line: "skipped k of n".

Plain Python, no framework: each backend tells :class:`SkipReport` about every step and shows the
returned text its own way; the reason (which names the backend's config fields) comes from the backend.
"""

from __future__ import annotations

DEFAULT_WARNING_EVERY = 10


class SkipReport:
    """Counts skipped steps and words the warnings.

    ``name`` is the algorithm's display name, ``reason`` why a step is skipped and what to change,
    ``note`` an optional sentence added to the first warning (what a skipped step means on that backend).
    """

    def __init__(self, name: str, reason: str, every: int = DEFAULT_WARNING_EVERY, note: str | None = None):
        if int(every) < 1:
            raise ValueError(f"skip warnings: every must be >= 1 (warn after that many skipped steps in a row), "
                             f"got {every!r}")
        self.name, self.reason, self.every, self.note = name, reason, int(every), note
        self.skipped = 0  # steps skipped so far
        self.steps = 0  # steps seen so far
        self.in_a_row = 0  # the current run of consecutive skipped steps

    def step(self, step: int, skipped: bool) -> str | None:
        """Record step ``step`` (the trainer's step number); the warning to show now, or None."""
        self.steps += 1
        if not skipped:
            self.in_a_row = 0
            return None
        self.skipped += 1
        self.in_a_row += 1
        if self.skipped == 1:
            first = f"{self.name} skipped optimizer step {step}: {self.reason}."
            return f"{first} {self.note}" if self.note else first
        if self.in_a_row % self.every == 0:
            return (f"{self.name} skipped {self.in_a_row} optimizer steps in a row (steps {step - self.in_a_row + 1}-"
                    f"{step}; {self.skipped} of {self.steps} so far): {self.reason}.")
        return None

    def summary(self) -> str:
        """The end-of-run line: how many steps were skipped (with the reason when any were)."""
        if self.skipped:
            return f"{self.name} skipped {self.skipped} of {self.steps} optimizer steps ({self.reason})."
        return f"{self.name} skipped 0 of {self.steps} optimizer steps."
