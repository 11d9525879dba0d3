"""HTTP routes that read what happened (to be built)."""

from fastapi import APIRouter

router = APIRouter()
