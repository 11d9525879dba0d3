"""Two workflows on one model (``tf-helpdesk``, the scripted helpdesk's): ``it-priced``
declares its own price for it (``Workflow(prices=...)``), ``it-unpriced`` does not (the
consumer's ``TURNFLEET_PRICES`` apply)."""

from tests.apps.scripted import HELPDESK_MODEL, HELPDESK_SCRIPT, helpdesk
from turnfleet import App, Workflow

OWN_PRICE = 5.0  # USD per 1M tokens, every kind of token
priced = Workflow(name="it-priced", agent=helpdesk, offline_script=HELPDESK_SCRIPT, model=HELPDESK_MODEL,
                  prices={HELPDESK_MODEL: {"input": OWN_PRICE, "cached_input": OWN_PRICE, "output": OWN_PRICE}})
unpriced = Workflow(name="it-unpriced", agent=helpdesk, offline_script=HELPDESK_SCRIPT, model=HELPDESK_MODEL)
app = App([priced, unpriced])
bad = Workflow(name="it-badprice", agent=helpdesk, offline_script=HELPDESK_SCRIPT, model=HELPDESK_MODEL,
               prices={HELPDESK_MODEL: {"input": "cheap", "cached_input": 1, "output": 1}})
