"""Ranking rules shared by the stages that keep a share of records (select, curate) or track which caption
an image came from (generate, select)."""

from __future__ import annotations

import math
from fractions import Fraction

from synthvlm.records import Record

SOURCE_ID_KEY = "source_id"  # provenance key naming the caption record an image was generated from


def fraction_count(n: int, fraction: float) -> int:
    """How many of `n` records top_fraction keeps: ceil(fraction * n), fraction read as a decimal."""
    return min(n, math.ceil(Fraction(str(fraction)) * n))


def source_id(record: Record) -> str:
    """The id of the caption record this record's image was generated from (itself if not recorded)."""
    return str(record.provenance.get(SOURCE_ID_KEY, record.id))
