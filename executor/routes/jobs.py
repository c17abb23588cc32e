"""Training jobs: DP-SGD on one site, and a site's part of a federated study."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from veil.executor.auth import Principal
from veil.executor.routes.deps import Id, principal, site_of
from veil.executor.site import Site
from veil.wire import JobInfo, TrainingCheck, TrainRequest

router = APIRouter()


@router.post("/jobs", response_model=JobInfo, status_code=201)
def train(body: TrainRequest, request: Request, who: Principal = Depends(principal),
          site: Site = Depends(site_of)) -> JobInfo:
    """Start a DP-SGD training job; its budget is reserved now and settled to what the accountant spends."""
    request.state.context = {"dataset": body.dataset}
    return site.train(who, body)


@router.post("/job-checks", response_model=TrainingCheck)
def check_training(body: TrainRequest, request: Request, who: Principal = Depends(principal),
                   site: Site = Depends(site_of)) -> TrainingCheck:
    """Whether POST /jobs would accept this request now (policy, public metadata, grant and cap), reserving and
    reading nothing; with the features' encoding. A study asks every site before any joins. (Not under /jobs/:
    /jobs/{job_id} would take its name for a job id.)"""
    request.state.context = {"dataset": body.dataset}
    return site.check_training(who, body)


@router.get("/jobs", response_model=list[JobInfo])
def list_jobs(limit: int = Query(default=50, ge=1, le=500), who: Principal = Depends(principal),
              site: Site = Depends(site_of)) -> list[JobInfo]:
    """Your project's training jobs at this site (a steward sees all), newest first."""
    return site.jobs(who, limit)


@router.get("/jobs/{job_id}", response_model=JobInfo)
def job(job_id: Id, who: Principal = Depends(principal), site: Site = Depends(site_of)) -> JobInfo:
    """A job's state, progress (share of steps, epoch, epsilon spent so far) and, when done, its DP evaluation."""
    return site.job(who, job_id)


@router.post("/jobs/{job_id}/cancel", response_model=JobInfo)
def cancel_job(job_id: Id, who: Principal = Depends(principal), site: Site = Depends(site_of)) -> JobInfo:
    return site.cancel_job(who, job_id)


@router.post("/jobs/{job_id}/round", response_class=Response,
             responses={200: {"content": {"application/x-protobuf": {}}}})
async def job_round(job_id: Id, request: Request, who: Principal = Depends(principal),
                    site: Site = Depends(site_of)) -> Response:
    """One round of a federated study: a Flower train message's content (protobuf RecordDict) in,
    the site's DP weights and public numbers out, in the same format."""
    body = await request.body()
    reply = await run_in_threadpool(site.train_round, who, job_id, body)
    return Response(reply, media_type="application/x-protobuf")


@router.post("/jobs/{job_id}/finish", response_model=JobInfo)
async def finish_job(job_id: Id, request: Request, who: Principal = Depends(principal),
                     site: Site = Depends(site_of)) -> JobInfo:
    """End a site's part of a federated study: with the final weights (safetensors) as the body, a DP
    evaluation on held-out patients; the budget is settled to what the site's accountant spent."""
    body = await request.body()
    return await run_in_threadpool(site.finish_job, who, job_id, body or None)


@router.get("/jobs/{job_id}/weights", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}})
def job_weights(job_id: Id, who: Principal = Depends(principal), site: Site = Depends(site_of)) -> Response:
    """The trained weights as safetensors (never a pickle)."""
    return Response(site.job_weights(who, job_id), media_type="application/octet-stream")
