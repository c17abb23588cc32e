"""Datasets' lifecycle: their state, stewards' requests to change it, and the reviews those need."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends

from veil.executor.auth import Principal
from veil.executor.routes.deps import Id, principal, site_of
from veil.executor.site import Site
from veil.wire import DatasetState, TransitionInfo, TransitionRequest, TransitionReview

router = APIRouter()


@router.get("/datasets/{name}/state", response_model=DatasetState)
def dataset_state(name: str, who: Principal = Depends(principal), site: Site = Depends(site_of)) -> DatasetState:
    """Where the dataset is in its lifecycle (draft, active, suspended, retired, destroyed), since when and why."""
    return site.dataset_state(who, name)


@router.post("/datasets/{name}/transitions", response_model=TransitionInfo, status_code=201)
def request_transition(name: str, body: TransitionRequest, who: Principal = Depends(principal),
                       site: Site = Depends(site_of)) -> TransitionInfo:
    """A steward asks to activate, suspend, resume, retire or destroy the dataset: done at once when the
    level's review rule is met by them alone (suspending always is), else pending another steward's review."""
    return site.request_transition(who, name, body)


@router.get("/dataset-transitions", response_model=list[TransitionInfo])
def transitions(status: Literal["pending", "done", "rejected", "all"] = "pending",
                who: Principal = Depends(principal), site: Site = Depends(site_of)) -> list[TransitionInfo]:
    """Dataset requests, newest first: those awaiting review, or those of one status, or all."""
    return site.transitions(who, None if status == "all" else status)


@router.post("/dataset-transitions/{transition_id}/reviews", response_model=TransitionInfo)
def review_transition(transition_id: Id, body: TransitionReview, who: Principal = Depends(principal),
                      site: Site = Depends(site_of)) -> TransitionInfo:
    """Another steward approves (applying it) or rejects a pending request."""
    return site.review_transition(who, transition_id, body)
