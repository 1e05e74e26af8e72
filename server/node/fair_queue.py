"""A model's waiting requests, taking turns between API keys: each key's requests in the order they came,
the keys round robin, so that one key's 200 requests wait behind each other key's next one rather than in
front of all of them. A key at its cap on concurrent renders is passed over until one of its renders ends.
With one key (or none) it is a plain first-in, first-out queue. Not thread-safe: its owner holds a lock."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._by_key: dict[str, deque[T]] = {}
        self._turns: deque[str] = deque()  # keys with requests waiting, the next to be served first
        self._keys: dict[int, str] = {}  # id(item) → its key
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        return (item for key in self._turns for item in self._by_key[key])

    def __contains__(self, item: T) -> bool:
        return id(item) in self._keys

    def append(self, item: T, key: str) -> None:
        if key not in self._by_key:
            self._by_key[key] = deque()
            self._turns.append(key)  # a key that had nothing waiting queues up behind the others
        self._by_key[key].append(item)
        self._keys[id(item)] = key
        self._size += 1

    def take(self, may_run: Callable[[str], bool] = lambda key: True) -> T | None:
        """The head of the first key in turn that `may_run`; that key then goes to the back of the turns."""
        for _ in range(len(self._turns)):
            key = self._turns[0]
            self._turns.rotate(-1)
            if may_run(key):
                return self._pop(key)
        return None

    def remove(self, item: T) -> None:
        key = self._keys[id(item)]
        self._by_key[key].remove(item)
        self._forget(key, item)

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    def _pop(self, key: str) -> T:
        item = self._by_key[key].popleft()
        self._forget(key, item)
        return item

    def _forget(self, key: str, item: T) -> None:
        del self._keys[id(item)]
        self._size -= 1
        if not self._by_key[key]:
            del self._by_key[key]
            self._turns.remove(key)
