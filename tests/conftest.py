"""Shared test setup: one intra-op thread for the whole session, and the "daaa" logger restored after each test."""

from __future__ import annotations

import logging
from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread() -> Iterator[None]:
    # the tests' networks are toy-sized: on 2 shared cores, spinning OpenMP threads cost far more than they gain
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_daaa_logger() -> Iterator[None]:
    # cli.main installs handlers on the "daaa" logger (captured stderr, RUN/log.txt); later tests must not inherit them
    log = logging.getLogger("daaa")
    handlers, propagate, level = list(log.handlers), log.propagate, log.level
    yield
    for h in set(log.handlers) - set(handlers):
        log.removeHandler(h)
        h.close()
    log.handlers[:], log.propagate, log.level = handlers, propagate, level
