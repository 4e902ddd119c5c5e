"""The run's ledger of bad training records: each skipped record counted once, over the whole run and every rank.

A dataset skips a record it cannot read (a header, an image that does not decode, a checksum mismatch) instead of
stopping, as long as the run has skipped no more than ``data.max_bad_records``. The parts of the training set only
report what they skipped (they are told ``report_only``); this ledger keeps the list, across DataLoader workers (the
messages arrive with the batch) and resumes (the list is in the checkpoint), and stops every rank together once
the limit is passed, with one :class:`~lafs.data.datasets.BadRecordsError` naming the file and the records.
"""

from __future__ import annotations

import torch

from ..data.datasets import BadRecordsError, face_datasets, too_many_bad_records
from .distributed import all_gather_objects, any_rank


class BadRecordLedger:
    def __init__(self, train_set, limit: int, device: torch.device) -> None:
        parts = face_datasets(train_set)
        for part in parts:
            part.report_only = True
        # those left out of the index when the data was opened come first; the messages name file, record, offset
        self.records: list[str] = list(dict.fromkeys(m for part in parts for m in part.bad_records))
        self.data_name = " + ".join(part.name for part in parts) or "the training data"
        self.limit, self.device = limit, device
        self._seen = set(self.records)

    def restore(self, saved: list[str]) -> None:
        """Take the list a checkpoint holds (a resumed run counts what it skipped before)."""
        self.records = list(dict.fromkeys(list(saved) + self.records))
        self._seen = set(self.records)

    def note(self, messages, logger) -> bool:
        """Count the records a batch's dataset skipped (each once); True when one is new."""
        new = [m for m in messages or () if m not in self._seen]
        for m in new:
            self._seen.add(m)
            self.records.append(m)
            logger.write(f"skipped a bad training record ({len(self.records)} so far, data.max_bad_records="
                         f"{self.limit}): {m}")
        return bool(new)

    def check(self) -> None:
        """Stop (every rank together) once more records were skipped than ``data.max_bad_records``."""
        if any_rank(len(self.records) > self.limit, self.device):
            raise BadRecordsError(too_many_bad_records(self.data_name, self.records or ["(on another rank)"],
                                                       self.limit))

    def gathered(self) -> list[str]:
        """Every rank's skipped records, once each (collective: every rank calls it)."""
        return list(dict.fromkeys(m for rank in all_gather_objects(self.records) for m in rank))
