"""Workers: arq processes that run one Support Desk turn per job with the Agents SDK."""
