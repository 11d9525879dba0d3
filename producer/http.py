"""HTTP routes that hand turns to the fleet (to be built)."""

from fastapi import APIRouter

router = APIRouter()
