"""moto's server, with DynamoDB's writes made atomic as DynamoDB's are.

moto serves each request on its own thread and checks a condition expression, then writes,
without a lock between the two, so two conditional UpdateItems that race can both succeed: two
execution environments would both "hold" one lease, which DynamoDB never allows. Every write
runs under one lock here; reads stay concurrent. Arguments are moto_server's (-H HOST -p PORT).
"""

import functools
import threading

from moto.dynamodb.models import DynamoDBBackend
from moto.server import main

_WRITE = threading.Lock()


def _atomic(method):
    @functools.wraps(method)
    def locked(*args, **kwargs):
        with _WRITE:
            return method(*args, **kwargs)

    return locked


for _name in ("put_item", "update_item", "delete_item", "transact_write_items"):
    setattr(DynamoDBBackend, _name, _atomic(getattr(DynamoDBBackend, _name)))

if __name__ == "__main__":
    main()
