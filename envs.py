"""Tiny, offline, procedurally generated text environments for paw, and the protocol they follow.

The environment protocol (what `paw.py --env module:Class` accepts)
-------------------------------------------------------------------
A class with a no-argument constructor and

    reset(seed: int) -> (obs: str, info: dict)
    step(action: str) -> (obs: str, reward: float, done: bool, info: dict)

and two class attributes:

    max_steps: int    the episode is cut after this many steps (the trainer also enforces it)
    R_max: float      the maximum achievable episode return (used by PAPER.md §2.3, lambda_g)

`info` (from reset and from every step) carries:

    admissible_actions: list[str]   the actions that do something in the current state
    task: str                       the goal text, shown to the agent in every prompt
    won: bool                       whether the task has been completed
    valid: bool                     whether the last action was admissible (True after reset)

Rules: `step` never raises on any string (empty, unicode, 10k characters, injection-like text): an
action that is not admissible is answered in-game ("Nothing happens.") with valid=False and leaves the
world unchanged. The same seed gives the same episode. Training uses seeds in [0, EVAL_SEED_START),
evaluation uses seeds from EVAL_SEED_START on, so the two never overlap.
"""
from __future__ import annotations

import importlib
import os
import random
import sys

EVAL_SEED_START = 1_000_000  # training seeds are below this, held-out evaluation seeds at or above it

PROTOCOL_INFO_KEYS = ("admissible_actions", "task", "won", "valid")

# ----------------------------------------------------------------------------------------------------
# textworld-tiny: a few rooms, portable objects, containers (some closed) and supporters; the goal is to
# put one object in/on one receptacle, which needs several steps (navigate, open, take, put).
# ----------------------------------------------------------------------------------------------------
ROOMS = ["kitchen", "pantry", "hallway", "bedroom", "garden", "cellar", "study", "bathroom", "attic"]
OBJECTS = ["apple", "key", "book", "mug", "coin", "candle", "sock", "knife", "pear", "ball"]
CONTAINERS = ["fridge", "chest", "box", "drawer", "cabinet", "basket", "safe"]
SUPPORTERS = ["table", "shelf", "counter", "bench", "desk"]
DIRECTIONS = {"north": "south", "south": "north", "east": "west", "west": "east"}
STEP = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}


def _join(words: list[str]) -> str:
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


class TextWorldTiny:
    """A TextWorld-style household game generated from the seed.

    2-3 rooms on a grid joined by exits; the goal object lies in one room (on the floor, on a
    supporter, or in an open container); the goal receptacle (a container, closed half of the time, or a
    supporter) lies in another room or the same one; a few distractor objects and receptacles. The
    observation is always the feedback to the last action followed by the description of the current
    room and what the player carries, so that the same world state always reads the same.
    Reward R_max on success (goal object in/on the goal receptacle), 0 otherwise. `look` and
    `inventory` are understood (valid) in every state but not listed as admissible: they change nothing,
    and a listed always-valid no-op is a trap a tiny policy falls into (it learns "always look").
    """

    name = "textworld-tiny"
    max_steps = 16
    R_max = 1.0

    # --- world generation --------------------------------------------------------------------------
    def reset(self, seed: int):
        rng = random.Random(int(seed))
        n_rooms = rng.choice([2, 3, 3])
        names = rng.sample(ROOMS, n_rooms)
        pos = {names[0]: (0, 0)}
        self.exits = {r: {} for r in names}
        for r in names[1:]:  # attach each new room to a random free side of an existing room
            while True:
                base = rng.choice(list(pos))
                d = rng.choice(sorted(DIRECTIONS))
                p = (pos[base][0] + STEP[d][0], pos[base][1] + STEP[d][1])
                if p not in pos.values():
                    break
            pos[r] = p
            self.exits[base][d] = r
            self.exits[r][DIRECTIONS[d]] = base
        objs = rng.sample(OBJECTS, 3)
        conts = rng.sample(CONTAINERS, 2)
        sups = rng.sample(SUPPORTERS, 2)
        # receptacles: name -> dict(kind, room, open, items)
        self.recs = {}
        for c in conts:
            self.recs[c] = dict(kind="container", room=rng.choice(names), open=rng.random() < 0.5, items=[])
        for s in sups:
            self.recs[s] = dict(kind="supporter", room=rng.choice(names), open=True, items=[])
        self.floor = {r: [] for r in names}
        goal_obj = objs[0]
        goal_rec = rng.choice(conts + sups)
        for o in objs:  # each object on a floor, a supporter or an *open* container, never the goal rec
            spots = [("floor", r) for r in names] + [
                ("rec", k) for k, v in self.recs.items() if v["open"] and k != goal_rec]
            kind, where = rng.choice(spots)
            (self.floor[where] if kind == "floor" else self.recs[where]["items"]).append(o)
        self.goal = (goal_obj, goal_rec)
        prep = "in" if self.recs[goal_rec]["kind"] == "container" else "on"
        self.task = f"put the {goal_obj} {prep} the {goal_rec}"
        self.room = rng.choice(names)
        self.inventory: list[str] = []
        self.won = False
        self.steps = 0
        return self._obs("You look around."), self._info(valid=True)

    # --- what the player sees ----------------------------------------------------------------------
    def _visible_objects(self) -> list[str]:
        out = list(self.floor[self.room])
        for v in self.recs.values():
            if v["room"] == self.room and v["open"]:
                out += v["items"]
        return out

    def _describe(self) -> str:
        r = self.room
        parts = [f"-= {r.capitalize()} =-"]
        here = [k for k, v in self.recs.items() if v["room"] == r]
        if here:
            names = [(("an open " if v["open"] else "a closed ") if v["kind"] == "container" else "a ") + k
                     for k, v in ((k, self.recs[k]) for k in here)]
            parts.append(f"You see {_join(names)}.")
        for k in here:
            v = self.recs[k]
            if v["items"] and v["open"]:
                prep = "In" if v["kind"] == "container" else "On"
                parts.append(f"{prep} the {k} is {_join(['a ' + i for i in v['items']])}.")
        if self.floor[r]:
            parts.append(f"On the floor is {_join(['a ' + i for i in self.floor[r]])}.")
        parts.append(f"Exits: {_join(sorted(self.exits[r]))}.")
        parts.append(f"You carry {_join(['a ' + i for i in self.inventory]) if self.inventory else 'nothing'}.")
        return " ".join(parts)

    def _obs(self, feedback: str) -> str:
        return feedback + " " + self._describe()

    def admissible_actions(self) -> list[str]:
        acts = [f"go {d}" for d in sorted(self.exits[self.room])]
        acts += [f"take {o}" for o in self._visible_objects()]
        for k, v in self.recs.items():
            if v["room"] == self.room and v["kind"] == "container":
                acts.append(f"{'close' if v['open'] else 'open'} {k}")
        for o in self.inventory:
            acts.append(f"drop {o}")
            for k, v in self.recs.items():
                if v["room"] == self.room and v["open"]:
                    acts.append(f"put {o} {'in' if v['kind'] == 'container' else 'on'} {k}")
        return acts  # `look` and `inventory` are always understood but change nothing, so not listed

    def _info(self, valid: bool) -> dict:
        return dict(admissible_actions=self.admissible_actions(), task=self.task, won=self.won, valid=valid)

    # --- dynamics ----------------------------------------------------------------------------------
    def step(self, action: str):
        if self.won or self.steps >= self.max_steps:
            return "The game is over.", 0.0, True, self._info(valid=False)
        self.steps += 1
        act = " ".join(str(action).split()) if isinstance(action, str) else ""
        valid = act in self.admissible_actions() or act in ("look", "inventory")
        if not valid:
            feedback = "Nothing happens."
        else:
            verb, _, rest = act.partition(" ")
            if verb == "go":
                self.room = self.exits[self.room][rest]
                feedback = f"You go {rest}."
            elif verb == "take":
                for holder in [self.floor[self.room]] + [v["items"] for v in self.recs.values()
                                                         if v["room"] == self.room and v["open"]]:
                    if rest in holder:
                        holder.remove(rest)
                        break
                self.inventory.append(rest)
                feedback = f"You take the {rest}."
            elif verb in ("open", "close"):
                self.recs[rest]["open"] = verb == "open"
                feedback = f"You {verb} the {rest}."
            elif verb == "drop":
                self.inventory.remove(rest)
                self.floor[self.room].append(rest)
                feedback = f"You drop the {rest}."
            elif verb == "put":
                obj, prep, rec = rest.split(" ")
                self.inventory.remove(obj)
                self.recs[rec]["items"].append(obj)
                feedback = f"You put the {obj} {prep} the {rec}."
                self.won = (obj, rec) == self.goal
            elif verb == "look":
                feedback = "You look around."
            else:  # inventory
                feedback = "You check your inventory."
        reward = self.R_max if self.won else 0.0
        if self.won:
            feedback += " You won!"
        done = self.won or self.steps >= self.max_steps
        return self._obs(feedback), reward, done, self._info(valid=valid)

    def vocabulary_text(self) -> list[str]:
        """Every word this environment can emit, so a word-level tokenizer has no [UNK] (PAPER.md §6)."""
        words = ROOMS + [r.capitalize() for r in ROOMS] + OBJECTS + CONTAINERS + SUPPORTERS + list(DIRECTIONS)
        return [" ".join(words), "Nothing happens. The game is over. You won! You check your inventory.",
                "You go north. You take the a an open closed close drop put in on look inventory",
                "You see In On the floor is Exits: and , You carry nothing. You look around."]


# ----------------------------------------------------------------------------------------------------
# Registry and loading of user environments (`--env module:Class`)
# ----------------------------------------------------------------------------------------------------
ENVS = {"textworld-tiny": TextWorldTiny}


class EnvError(ValueError):
    """An environment name or class that cannot be used; the message says why."""


def load_env_class(name: str):
    """A built-in name or `module:Class` (module importable from the working directory or PYTHONPATH)."""
    if name in ENVS:
        return ENVS[name]
    if ":" not in name:
        raise EnvError(f"unknown environment {name!r}; built-in: {', '.join(sorted(ENVS))}, "
                       "or give your own as module:Class")
    mod_name, _, cls_name = name.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module, report it plainly
        raise EnvError(f"cannot import module {mod_name!r} for --env {name}: {type(e).__name__}: {e}") from None
    cls = getattr(mod, cls_name, None)
    if cls is None:
        raise EnvError(f"module {mod_name!r} has no class {cls_name!r}")
    check_env_class(cls, name)
    return cls


def _check_info(info, where: str, name: str):
    if not isinstance(info, dict):
        raise EnvError(f"{name}: {where} must return an info dict, got {type(info).__name__}")
    missing = [k for k in PROTOCOL_INFO_KEYS if k not in info]
    if missing:
        raise EnvError(f"{name}: the info dict from {where} lacks {', '.join(missing)}")
    acts = info["admissible_actions"]
    if not isinstance(acts, (list, tuple)) or not all(isinstance(a, str) for a in acts):
        raise EnvError(f"{name}: info['admissible_actions'] from {where} must be a list of str")
    if not isinstance(info["task"], str):
        raise EnvError(f"{name}: info['task'] from {where} must be a str")


def check_env_class(cls, name: str = "env"):
    """Run one short episode and check every part of the protocol, with one clear error per problem."""
    for attr in ("reset", "step"):
        if not callable(getattr(cls, attr, None)):
            raise EnvError(f"{name}: the class has no method {attr}()")
    for attr, typ in (("max_steps", int), ("R_max", (int, float))):
        v = getattr(cls, attr, None)
        if not isinstance(v, typ) or v <= 0:
            raise EnvError(f"{name}: the class must declare a positive {attr} (got {v!r})")
    try:
        env = cls()
        out = env.reset(0)
    except Exception as e:  # noqa: BLE001
        raise EnvError(f"{name}: constructing or reset(0) failed: {type(e).__name__}: {e}") from None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise EnvError(f"{name}: reset(seed) must return (obs, info), got {type(out).__name__}")
    if not isinstance(out[0], str):
        raise EnvError(f"{name}: reset(seed) returned a non-string observation ({type(out[0]).__name__})")
    _check_info(out[1], "reset", name)
    acts = out[1]["admissible_actions"]
    try:
        out = env.step(acts[0] if acts else "look")
    except Exception as e:  # noqa: BLE001
        raise EnvError(f"{name}: step() failed: {type(e).__name__}: {e}") from None
    if not (isinstance(out, tuple) and len(out) == 4):
        raise EnvError(f"{name}: step(action) must return (obs, reward, done, info), got "
                       f"{type(out).__name__} of length {len(out) if isinstance(out, tuple) else '?'}")
    obs, reward, done, info = out
    if not isinstance(obs, str):
        raise EnvError(f"{name}: step() returned a non-string observation ({type(obs).__name__})")
    if not isinstance(reward, (int, float)):
        raise EnvError(f"{name}: step() returned a non-numeric reward ({type(reward).__name__})")
    _check_info(info, "step", name)


def random_rollout(env, seed: int, rng: random.Random, invalid_prob: float = 0.0):
    """One episode of the uniformly random admissible-action policy; returns (won, transcript)."""
    obs, info = env.reset(seed)
    transcript = [obs]
    for _ in range(env.max_steps):
        acts = info["admissible_actions"]
        a = "xyzzy" if (rng.random() < invalid_prob or not acts) else rng.choice(acts)
        obs, r, done, info = env.step(a)
        transcript += [a, obs]
        if done:
            break
    return bool(info["won"]), transcript
