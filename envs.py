"""Tiny, offline, procedurally generated text environments for paw, and the protocol they follow.

The environment protocol (what `paw.py --env module:Class` accepts)
-------------------------------------------------------------------
A class with a no-argument constructor and

    reset(seed: int) -> (obs: str, info: dict)
    step(action: str) -> (obs: str, reward: float, done: bool, info: dict)

and two class attributes:

    max_steps: int    the episode is cut after this many steps (the trainer also enforces it)
    R_max: float      the maximum achievable episode return (used by §2.3's lambda_g, docs/method.md)

`info` (from reset and from every step) carries:

    admissible_actions: list[str]   the actions that do something in the current state
    task: str                       the goal text, shown to the agent in every prompt
    won: bool                       whether the task has been completed
    valid: bool                     whether the last action was admissible (True after reset)

Optional: `decision_points()` (see TextWorldTiny) names the key decisions of the current state; `goal_names()`
maps the names the task refers to onto placeholder words (see GoalNamesAbstracted); a class attribute
`prompt_layout` ("minimal": the admissible actions say all a decision needs) picks the tiny model's prompt; and
`text_episodes` sets how many random episodes paw plays for the tiny tokenizer's text (default 1000; fewer where
a step is expensive, as in TextWorldGames).

Rules: `step` never raises on any string (empty, unicode, 10k characters, injection-like text): an
action that is not admissible is answered in-game ("Nothing happens.") with valid=False and leaves the
world unchanged. The same seed gives the same episode. Training uses seeds in [0, EVAL_SEED_START),
evaluation uses seeds from EVAL_SEED_START on, so the two never overlap.
"""
from __future__ import annotations

import importlib
import math
import numbers
import os
import random
import re
import sys
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

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
    prompt_layout = "minimal"  # the admissible actions say all a decision needs (docs/method.md, "Agent interface")
    room_counts = (2, 3, 3)   # drawn uniformly per seed
    n_objects, n_containers, n_supporters = 3, 2, 2
    closed_goal = False       # the goal receptacle is always a closed container (sparse variant)

    # --- world generation --------------------------------------------------------------------------
    def reset(self, seed: int):
        rng = random.Random(int(seed))
        n_rooms = rng.choice(self.room_counts)
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
        objs = rng.sample(OBJECTS, self.n_objects)
        conts = rng.sample(CONTAINERS, self.n_containers)
        sups = rng.sample(SUPPORTERS, self.n_supporters)
        # receptacles: name -> dict(kind, room, open, items)
        self.recs = {}
        for c in conts:
            self.recs[c] = dict(kind="container", room=rng.choice(names), open=rng.random() < 0.5, items=[])
        for s in sups:
            self.recs[s] = dict(kind="supporter", room=rng.choice(names), open=True, items=[])
        self.floor = {r: [] for r in names}
        goal_obj = objs[0]
        goal_rec = rng.choice(conts if self.closed_goal else conts + sups)
        if self.closed_goal:
            self.recs[goal_rec]["open"] = False
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

    def decision_points(self) -> dict[str, list[str]]:
        """The key decisions of the current state and the actions that get each one right (optional
        protocol method; paw logs how often the policy gets each right, `decision/<name>`):
        take_goal: the goal object is in sight; open_goal: carrying it before the closed goal container;
        put_goal: carrying it before the open goal receptacle; move: nothing here helps, any exit is right."""
        obj, rec = self.goal
        carrying, rec_here = obj in self.inventory, self.recs[rec]["room"] == self.room
        if not carrying and obj in self._visible_objects():
            return {"take_goal": [f"take {obj}"]}
        if carrying and rec_here and not self.recs[rec]["open"]:
            return {"open_goal": [f"open {rec}"]}
        if carrying and rec_here:
            return {"put_goal": [f"put {obj} {'in' if self.recs[rec]['kind'] == 'container' else 'on'} {rec}"]}
        return {"move": [f"go {d}" for d in sorted(self.exits[self.room])]}

    def goal_names(self) -> dict[str, str]:
        """The names the task refers to -> placeholder words (optional protocol method, see GoalNamesAbstracted):
        the goal object and the goal receptacle of this episode."""
        return {self.goal[0]: "OBJ", self.goal[1]: "REC"}

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
        """Every word this environment can emit, so a word-level tokenizer has no [UNK] (§6)."""
        words = ROOMS + [r.capitalize() for r in ROOMS] + OBJECTS + CONTAINERS + SUPPORTERS + list(DIRECTIONS)
        return [" ".join(words), "Nothing happens. The game is over. You won! You check your inventory.",
                "You go north. You take the a an open closed close drop put in on look inventory",
                "You see In On the floor is Exits: and , You carry nothing. You look around."]


class TextWorldTinySparse(TextWorldTiny):
    """textworld-tiny's sparse variant: 5-6 rooms, more objects and receptacles, the goal receptacle always
    a closed container, so more steps are needed; the
    reward is still only the final success, so the random policy almost never gets any signal."""
    name = "textworld-tiny-sparse"
    max_steps = 20
    room_counts = (5, 6)
    n_objects, n_containers, n_supporters = 6, 5, 4
    closed_goal = True


# ----------------------------------------------------------------------------------------------------
# alfworld-tiny: ALFWorld's household and its six task types, as text. One room of numbered receptacles
# (some closed), numbered objects; the agent walks to receptacles ("go to fridge 1"), opens them, holds
# one object at a time and uses the sink, microwave, fridge and desk lamp to clean, heat, cool, examine.
# ----------------------------------------------------------------------------------------------------
ALF_RECEPTACLES = {  # name -> openable
    "countertop 1": False, "countertop 2": False, "sinkbasin 1": False, "microwave 1": True, "fridge 1": True,
    "drawer 1": True, "drawer 2": True, "cabinet 1": True, "cabinet 2": True, "desk 1": False,
    "shelf 1": False, "diningtable 1": False, "garbagecan 1": False, "sidetable 1": False}
ALF_APPLIANCES = {"clean": "sinkbasin 1", "heat": "microwave 1", "cool": "fridge 1"}
ALF_OBJECTS = {  # type -> which transformations make sense for it
    "apple": {"clean", "heat", "cool"}, "potato": {"clean", "heat", "cool"}, "egg": {"heat", "cool"},
    "tomato": {"clean", "heat", "cool"}, "mug": {"clean", "heat", "cool", "examine"},
    "cup": {"clean", "heat", "cool", "examine"}, "plate": {"clean", "cool"}, "bowl": {"clean", "heat", "cool"},
    "book": {"examine"}, "pen": {"examine"}, "cd": {"examine"}, "keychain": {"examine"},
    "creditcard": {"examine"}, "pencil": {"examine"}, "spoon": {"clean"}, "knife": {"clean"}}
ALF_TASK_TYPES = ["pick_and_place", "look_at_obj_in_light", "pick_clean_then_place", "pick_heat_then_place",
                  "pick_cool_then_place", "pick_two_obj"]
ALF_TARGETS = ["countertop 1", "countertop 2", "drawer 1", "drawer 2", "cabinet 1", "cabinet 2", "shelf 1",
               "diningtable 1", "sidetable 1", "garbagecan 1", "fridge 1", "microwave 1"]


class AlfWorldTiny:
    """ALFWorld in miniature, generated from the seed: 7 receptacles (microwave, fridge and drawer
    closed at the start), 3-5 objects, one task of one of ALFWorld's six types. Observations are
    ALFWorld-style feedback ("You arrive at fridge 1. The fridge 1 is closed."), so the same state and
    action read the same. Reward R_max on success, 0 otherwise; `info["task_type"]` names the type."""

    name = "alfworld-tiny"
    max_steps = 24
    R_max = 1.0
    n_objects = (3, 4)
    task_types = ALF_TASK_TYPES
    receptacles = ["countertop 1", "sinkbasin 1", "microwave 1", "fridge 1", "drawer 1", "desk 1", "shelf 1"]

    def reset(self, seed: int):
        rng = random.Random(int(seed))
        self.task_type = rng.choice(self.task_types)
        need = {"pick_clean_then_place": "clean", "pick_heat_then_place": "heat", "pick_cool_then_place": "cool",
                "look_at_obj_in_light": "examine"}.get(self.task_type)
        goal_type = rng.choice(sorted(t for t, caps in ALF_OBJECTS.items() if need is None or need in caps))
        n_goal = 2 if self.task_type == "pick_two_obj" else 1
        target = None
        if self.task_type != "look_at_obj_in_light":
            target = rng.choice([r for r in ALF_TARGETS if r != ALF_APPLIANCES.get(need) and r in self.receptacles])
        others = rng.sample(sorted(t for t in ALF_OBJECTS if t != goal_type), rng.randint(*self.n_objects) - n_goal)
        types = [goal_type] * (n_goal + rng.randint(0, 1)) + others
        self.contents = {r: [] for r in self.receptacles}
        self.is_open = {r: not ALF_RECEPTACLES[r] for r in self.receptacles}
        count: dict = {}
        spots = [r for r in self.receptacles if r not in (target, "garbagecan 1")]
        for t in types:
            count[t] = count.get(t, 0) + 1
            self.contents[rng.choice(spots)].append(f"{t} {count[t]}")
        self.goal_type, self.n_goal, self.target = goal_type, n_goal, target
        self.state = {o: set() for r in self.contents for o in self.contents[r]}  # object -> {clean, hot, cool}
        self.location, self.holding, self.steps, self.won = "middle", None, 0, False
        self.lamp_on = False
        where = f"{'in' if ALF_RECEPTACLES[target] else 'on'} {target}" if target else ""
        self.task = {"pick_and_place": f"put a {goal_type} {where}",
                     "look_at_obj_in_light": f"look at the {goal_type} under the desklamp",
                     "pick_clean_then_place": f"put a clean {goal_type} {where}",
                     "pick_heat_then_place": f"put a hot {goal_type} {where}",
                     "pick_cool_then_place": f"put a cool {goal_type} {where}",
                     "pick_two_obj": f"put two {goal_type} {where}"}[self.task_type]
        seen = ", ".join("a " + r for r in self.receptacles)
        obs = f"You are in the middle of a room. Looking quickly around you, you see {seen}."
        return obs, self._info(True)

    def goal_names(self) -> dict[str, str]:
        """The task's object type and target receptacle -> placeholder words (see GoalNamesAbstracted)."""
        return {self.goal_type: "OBJ", **({self.target: "REC"} if self.target else {})}

    # --- helpers -----------------------------------------------------------------------------------
    def _listing(self, r: str) -> str:
        items = self.contents[r]
        what = ", ".join("a " + o for o in items) if items else "nothing"
        return f"{'In' if ALF_RECEPTACLES[r] else 'On'} the {r}, you see {what}."

    def admissible_actions(self) -> list[str]:
        acts = [f"go to {r}" for r in self.receptacles if r != self.location]
        r = self.location
        if r != "middle":
            if ALF_RECEPTACLES[r]:
                acts.append(f"{'close' if self.is_open[r] else 'open'} {r}")
            if self.is_open[r]:
                if self.holding is None:
                    acts += [f"take {o} from {r}" for o in self.contents[r]]
                else:
                    acts.append(f"put {self.holding} {'in' if ALF_RECEPTACLES[r] else 'on'} {r}")
            if self.holding is not None:
                for verb, app in ALF_APPLIANCES.items():
                    if r == app and verb in ALF_OBJECTS[self.holding.split()[0]]:
                        acts.append(f"{verb} {self.holding} with {app}")
            if r == "desk 1":
                acts.append("use desklamp 1")
        return acts

    def _info(self, valid: bool) -> dict:
        return dict(admissible_actions=self.admissible_actions(), task=self.task, won=self.won, valid=valid,
                    task_type=self.task_type)

    def _check_goal(self):
        if self.task_type == "look_at_obj_in_light":
            return self.lamp_on and self.holding is not None and self.holding.split()[0] == self.goal_type
        need = {"pick_clean_then_place": "clean", "pick_heat_then_place": "hot", "pick_cool_then_place": "cool"}
        ok = [o for o in self.contents[self.target] if o.split()[0] == self.goal_type
              and (self.task_type not in need or need[self.task_type] in self.state[o])]
        return len(ok) >= self.n_goal

    # --- dynamics ----------------------------------------------------------------------------------
    def step(self, action: str):
        if self.won or self.steps >= self.max_steps:
            return "The game is over.", 0.0, True, self._info(False)
        self.steps += 1
        act = " ".join(action.split()) if isinstance(action, str) else ""
        valid = act in self.admissible_actions() or act in ("look", "inventory")
        if not valid:
            fb = "Nothing happens."
        elif act == "look":
            fb = "You are in the middle of a room." if self.location == "middle" else f"You are facing the {self.location}."
        elif act == "inventory":
            fb = f"You are carrying: a {self.holding}." if self.holding else "You are not carrying anything."
        elif act.startswith("go to "):
            r = self.location = act[6:]
            fb = f"You arrive at {r}. " + (self._listing(r) if self.is_open[r] else f"The {r} is closed.")
        elif act.startswith(("open ", "close ")):
            verb, r = act.split(" ", 1)
            self.is_open[r] = verb == "open"
            fb = f"You open the {r}. " + self._listing(r) if verb == "open" else f"You close the {r}."
        elif act.startswith("take "):
            o, r = act[5:].split(" from ")
            self.contents[r].remove(o)
            self.holding = o
            fb = f"You pick up the {o} from the {r}."
        elif act.startswith("put "):
            o, r = act[4:].split(" in " if " in " in act else " on ")
            self.contents[r].append(o)
            self.holding = None
            fb = f"You put the {o} {'in' if ALF_RECEPTACLES[r] else 'on'} the {r}."
        elif act == "use desklamp 1":
            self.lamp_on = True
            fb = "You turn on the desklamp 1."
        else:  # clean / heat / cool
            verb = act.split()[0]
            self.state[self.holding].add({"clean": "clean", "heat": "hot", "cool": "cool"}[verb])
            fb = f"You {verb} the {self.holding} using the {ALF_APPLIANCES[verb]}."
        if valid and not act.startswith("use") and self.location != "desk 1":
            self.lamp_on = False  # the lamp only counts while the agent stands at the desk with the object
        self.won = self._check_goal()
        if self.won:
            fb += " You won!"
        done = self.won or self.steps >= self.max_steps
        return fb, (self.R_max if self.won else 0.0), done, self._info(valid)

    def vocabulary_text(self) -> list[str]:
        words = [f"{t} {i}" for t in ALF_OBJECTS for i in (1, 2, 3)] + list(ALF_RECEPTACLES) + list(ALF_TASK_TYPES)
        return [" ".join(words), "You are in the middle of a room. Looking quickly around you, you see a",
                "You arrive at The is closed. In On the you see nothing. You open close pick up from put in on",
                "You turn on the desklamp 1. You clean heat cool using You are facing carrying: not anything.",
                "put a clean hot cool two look at under Nothing happens. The game is over. You won! use with"]


class AlfWorldTinySparse(AlfWorldTiny):
    """alfworld-tiny's sparse variant: only the two-stage task types (clean/heat/cool then place, pick two),
    all 14 receptacles, 10-13 objects, a longer horizon; the random policy almost never succeeds."""
    name = "alfworld-tiny-sparse"
    max_steps = 40
    n_objects = (9, 12)
    receptacles = list(ALF_RECEPTACLES)
    task_types = ["pick_clean_then_place", "pick_heat_then_place", "pick_cool_then_place", "pick_two_obj"]


# ----------------------------------------------------------------------------------------------------
# webshop-tiny: WebShop in miniature. An instruction asks for a product with attributes, an option and a
# price limit; the agent searches with free text, reads a results page of products with random IDs, brands
# and prices (the unpredictable tokens that motivate CMAE, §2.2), opens a product, picks an
# option and buys. Reward = fraction of the requested attributes/option/price matched.
# ----------------------------------------------------------------------------------------------------
WS_CATEGORIES = ["shirt", "jacket", "dress", "sneakers", "boots", "hat", "backpack", "scarf", "jeans", "sweater"]
WS_COLORS = ["red", "blue", "black", "white", "green", "grey", "brown", "pink"]
WS_MATERIALS = ["cotton", "wool", "leather", "linen", "denim", "silk", "polyester"]
WS_SIZES = ["xs", "small", "medium", "large", "xl"]
WS_BRANDS = ["acme", "nordik", "zentro", "bellamy", "orvo", "quilla", "tamsin", "brisa", "kovak", "lumen",
             "marlo", "pexa", "rivon", "solace", "trevi", "umbra", "vesta", "wilder", "yarrow", "zephyr"]
WS_IDS = [f"B0{c1}{c2}{d}" for c1 in "ADFHKMPRTX" for c2 in "CGJLNQSVWZ" for d in "2468"]  # 400 random-looking IDs


def _tokens(text: str) -> list[str]:
    return "".join(ch.lower() if ch.isalnum() else " " for ch in text).split()


class WebShopTiny:
    """A shop of ~30 generated products per seed (every attribute combination drawn at random, with near
    misses of the requested item: right category but wrong colour, over the price limit, ...). Pages:
    search -> results (by word overlap with the query, 5 per page, with random IDs, brands, prices) -> product
    (options, price) -> buy. Actions: `search <any text>`, `click <id>`, `next page`, `prev page`,
    `select <size>`, `buy now`, `back to search`. The admissible list offers a few search queries built from the instruction's words
    and the shop's vocabulary; any `search ...` text is accepted on the search page."""

    name = "webshop-tiny"
    max_steps = 10
    R_max = 1.0
    n_products = 30
    n_near_misses = 7
    sizes_per_product = 3
    partial_reward = True

    def reset(self, seed: int):
        rng = random.Random(int(seed))
        ids = rng.sample(WS_IDS, self.n_products)
        want = dict(category=rng.choice(WS_CATEGORIES), color=rng.choice(WS_COLORS),
                    material=rng.choice(WS_MATERIALS), size=rng.choice(WS_SIZES), budget=rng.choice([30, 40, 50, 60, 80]))
        self.want = want
        self.products = []
        for i, pid in enumerate(ids):
            p = dict(id=pid, brand=rng.choice(WS_BRANDS), category=rng.choice(WS_CATEGORIES),
                     color=rng.choice(WS_COLORS), material=rng.choice(WS_MATERIALS),
                     sizes=sorted(rng.sample(WS_SIZES, self.sizes_per_product), key=WS_SIZES.index),
                     price=round(rng.uniform(10, 120), 2))
            if i == 0:  # the exact match exists
                p.update(category=want["category"], color=want["color"], material=want["material"],
                         price=round(rng.uniform(8, want["budget"] - 1), 2))
                if want["size"] not in p["sizes"]:
                    p["sizes"] = sorted(p["sizes"][1:] + [want["size"]], key=WS_SIZES.index)
            elif i <= self.n_near_misses:  # near misses: the requested category with one thing wrong
                p["category"] = want["category"]
                wrong = rng.choice(["color", "material", "price"])
                if wrong == "price":
                    p.update(color=want["color"], material=want["material"],
                             price=round(rng.uniform(want["budget"] + 1, want["budget"] + 60), 2))
                else:
                    p.update({k: want[k] for k in ("color", "material") if k != wrong})
                    p[wrong] = rng.choice([v for v in (WS_COLORS if wrong == "color" else WS_MATERIALS) if v != want[wrong]])
            self.products.append(p)
        rng.shuffle(self.products)
        self.task = (f"find a {want['color']} {want['material']} {want['category']} in size {want['size']}, "
                     f"price lower than {want['budget']} dollars")
        self.page, self.ranked, self.page_no, self.item, self.size = "search", [], 0, None, None
        self.steps, self.won, self.done = 0, False, False
        return self._render("Welcome to the shop."), self._info(True)

    # --- pages -------------------------------------------------------------------------------------
    def _title(self, p) -> str:
        return f"{p['brand']} {p['color']} {p['material']} {p['category']}"

    def _render(self, feedback: str) -> str:
        if self.page == "search":
            return f"{feedback} [search page] Type a search query."
        if self.page == "results":
            rows = " ".join(f"[{p['id']}] {self._title(p)} ${p['price']:.2f} ;" for p in self.results)
            return f"{feedback} [results page {self.page_no + 1}] {rows or 'no products found.'}"
        p = self.item
        chosen = f" Selected size: {self.size}." if self.size else ""
        return (f"{feedback} [product {p['id']}] {self._title(p)}. Price: ${p['price']:.2f}. "
                f"Sizes: {' '.join(p['sizes'])}.{chosen}")

    def _queries(self) -> list[str]:
        w = self.want
        return [f"search {w['category']}", f"search {w['color']} {w['category']}",
                f"search {w['material']} {w['category']}", f"search {w['color']} {w['material']} {w['category']}"]

    def admissible_actions(self) -> list[str]:
        if self.page == "search":
            return self._queries()
        if self.page == "results":
            more = ["next page"] if 5 * (self.page_no + 1) < len(self.ranked) else []
            return ([f"click {p['id']}" for p in self.results] + more + (["prev page"] if self.page_no else [])
                    + ["back to search"])
        return [f"select {s}" for s in self.item["sizes"]] + ["buy now", "back to search"]

    def _info(self, valid: bool) -> dict:
        return dict(admissible_actions=self.admissible_actions(), task=self.task, won=self.won, valid=valid)

    @property
    def results(self) -> list[dict]:
        return self.ranked[5 * self.page_no:5 * self.page_no + 5]

    def search(self, query: str) -> list[dict]:
        """Products sharing a word with the query, most shared words first (ties: shop order, which is
        random per seed); shown five per results page."""
        q = set(_tokens(query))
        scored = [(-len(q & set(_tokens(self._title(p)))), i) for i, p in enumerate(self.products)]
        return [self.products[i] for s, i in sorted(scored) if s < 0]

    def score(self, p, size) -> float:
        w = self.want
        hits = [p["category"] == w["category"], p["color"] == w["color"], p["material"] == w["material"],
                size == w["size"], p["price"] < w["budget"]]
        return sum(hits) / len(hits)

    # --- dynamics ----------------------------------------------------------------------------------
    def step(self, action: str):
        if self.done or self.steps >= self.max_steps:
            return "The episode is over.", 0.0, True, self._info(False)
        self.steps += 1
        act = " ".join(action.split()).lower() if isinstance(action, str) else ""
        reward, fb = 0.0, ""
        valid = act in [a.lower() for a in self.admissible_actions()] or (self.page == "search" and act.startswith("search ")
                                                    and len(_tokens(act)) > 1)
        if not valid:
            fb = "Nothing happens."
        elif act.startswith("search "):
            self.ranked, self.page, self.page_no = self.search(act[7:]), "results", 0
            fb = f"You search for: {' '.join(_tokens(act[7:])[:12])}."
        elif act in ("next page", "prev page"):
            self.page_no += 1 if act == "next page" else -1
            fb = f"You go to results page {self.page_no + 1}."
        elif act == "back to search":
            self.page, self.item, self.size = "search", None, None
            fb = "You go back to the search page."
        elif act.startswith("click "):
            self.item = next(p for p in self.results if p["id"] == act[6:].upper())
            self.page, self.size = "product", None
            fb = f"You open {self.item['id']}."
        elif act.startswith("select "):
            self.size = act[7:]
            fb = f"You select size {self.size}."
        else:  # buy now
            s = self.score(self.item, self.size)
            self.won, self.done = s == 1.0, True
            reward = s * self.R_max if self.partial_reward else float(self.won) * self.R_max
            fb = f"You bought {self.item['id']}. Match {s:.2f}." + (" You won!" if self.won else "")
        done = self.done or self.steps >= self.max_steps
        return self._render(fb), reward, done, self._info(valid)

    def vocabulary_text(self) -> list[str]:
        return [" ".join(WS_CATEGORIES + WS_COLORS + WS_MATERIALS + WS_SIZES + WS_BRANDS),
                " ".join(WS_IDS), " ".join(f"{i}" for i in range(200)),
                "Welcome to the shop. [search page] Type a search query. [results page ] [product ] $ . ; Price: Sizes:",
                "next page prev page You go to results no products found.",
                "Selected size: You search for: You go back to the search page. You open select click buy now",
                "back to search find a in size , price lower than dollars You bought Match You won! Nothing happens.",
                "The episode is over."]


class WebShopTinySparse(WebShopTiny):
    """webshop-tiny's sparse variant (the paper's sparse WebShop case): reward only for a full match (no
    partial credit), a bigger shop with more near misses; the random policy almost never succeeds."""
    name = "webshop-tiny-sparse"
    max_steps = 15
    n_products = 60
    n_near_misses = 24
    sizes_per_product = 4
    partial_reward = False


# ----------------------------------------------------------------------------------------------------
# search-tiny: search-augmented QA over a generated knowledge base. Single-hop and two-hop questions;
# `search <query>` returns the top documents of a TF-IDF retriever (numpy), `answer <text>` ends the
# episode; reward = exact match after normalisation.
# ----------------------------------------------------------------------------------------------------
SQ_FIRST = ["alma", "bruno", "carys", "dario", "elin", "farid", "greta", "hugo", "ines", "jonas", "kira", "lars",
            "mira", "nils", "olga", "pavel", "rosa", "soren", "tara", "viktor"]
SQ_LAST = ["reyes", "holt", "marsh", "okafor", "lindqvist", "moreau", "tanaka", "varga", "keane", "dupont",
           "novak", "silva", "brandt", "castel", "ferro", "hale", "ivanova", "jensen", "kowal", "laine"]
SQ_CITIES = ["velmora", "dunmere", "ostrava", "karsh", "lumenport", "brightwater", "talon", "emberly",
             "corvale", "mistral", "northhaven", "saltmere", "ravelin", "quarry", "windrow", "ashby"]
SQ_COUNTRIES = ["tarsk", "olvania", "bretmark", "sundria", "kaloria", "vessen", "marivo", "drelland"]
SQ_COMPANIES = ["quill labs", "ironleaf", "bluefen", "corvid works", "northwind", "silverline", "tidewater",
                "amberforge", "kestrel", "lanternhouse"]
SQ_JOBS = ["painter", "engineer", "chemist", "pilot", "composer", "architect", "surgeon", "poet"]


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles, single spaces (the usual QA exact-match normalisation)."""
    words = "".join(ch.lower() if ch.isalnum() or ch.isspace() else " " for ch in text).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


class SearchTiny:
    """A knowledge base generated from the seed: people (job, birth city), cities (country), companies
    (founder, headquarters city), one short document each. A question is single-hop ("Where was Alma Reyes
    born?") or two-hop ("In which country was the founder of Ironleaf born?"). `search <query>` returns
    the top-k documents of a TF-IDF retriever; `answer <text>` ends the episode. The admissible list offers
    `search <entity>` for every entity seen so far (question and retrieved documents) and `answer <entity>`
    for every entity seen in a retrieved document; any `search ...` / `answer ...` text is accepted."""

    name = "search-tiny"
    max_steps = 6
    R_max = 1.0
    two_hop_prob = 0.5
    top_k = 3
    sizes = dict(people=6, cities=6, countries=4, companies=4)

    def reset(self, seed: int):
        rng = random.Random(int(seed))
        n = self.sizes
        names = rng.sample([f"{f} {l}" for f in SQ_FIRST for l in SQ_LAST], n["people"])
        cities, countries = rng.sample(SQ_CITIES, n["cities"]), rng.sample(SQ_COUNTRIES, n["countries"])
        companies = rng.sample(SQ_COMPANIES, n["companies"])
        self.country_of = {c: rng.choice(countries) for c in cities}
        self.born = {p: rng.choice(cities) for p in names}
        self.job = {p: rng.choice(SQ_JOBS) for p in names}
        self.founder = {c: rng.choice(names) for c in companies}
        self.hq = {c: rng.choice(cities) for c in companies}
        docs = {p: f"{p} is a {self.job[p]}. {p} was born in {self.born[p]}." for p in names}
        docs.update({c: f"{c} is a city in {self.country_of[c]}." for c in cities})
        docs.update({c: f"{c} is a company founded by {self.founder[c]}. {c} is based in {self.hq[c]}."
                     for c in companies})
        self.entities = names + cities + countries + companies
        self.doc_keys, self.docs = list(docs), [docs[k] for k in docs]
        self._index()
        if rng.random() < self.two_hop_prob:
            kind = rng.choice(["country_born", "founder_born", "hq_country"])
            if kind == "country_born":
                p = rng.choice(names)
                self.question, self.answer = f"in which country was {p} born?", self.country_of[self.born[p]]
            elif kind == "founder_born":
                c = rng.choice(companies)
                self.question, self.answer = f"where was the founder of {c} born?", self.born[self.founder[c]]
            else:
                c = rng.choice(companies)
                self.question, self.answer = f"in which country is {c} based?", self.country_of[self.hq[c]]
            self.hops = 2
        else:
            kind = rng.choice(["born", "country", "founder", "hq"])
            if kind == "born":
                p = rng.choice(names)
                self.question, self.answer = f"where was {p} born?", self.born[p]
            elif kind == "country":
                c = rng.choice(cities)
                self.question, self.answer = f"in which country is {c}?", self.country_of[c]
            elif kind == "founder":
                c = rng.choice(companies)
                self.question, self.answer = f"who founded {c}?", self.founder[c]
            else:
                c = rng.choice(companies)
                self.question, self.answer = f"where is {c} based?", self.hq[c]
            self.hops = 1
        self.task = f"answer the question: {self.question}"
        self.seen = [e for e in self.entities if e in self.question]  # entities the agent can search for
        self.candidates: list[str] = []  # entities seen in retrieved documents
        self.steps, self.won, self.done = 0, False, False
        return f"Question: {self.question} Search the knowledge base, then answer.", self._info(True)

    # --- the retriever: TF-IDF with cosine similarity, in numpy ------------------------------------
    def _index(self):
        toks = [_tokens(d) for d in self.docs]
        self.vocab = {w: i for i, w in enumerate(sorted({w for t in toks for w in t}))}
        tf = np.zeros((len(toks), len(self.vocab)))
        for i, t in enumerate(toks):
            for w in t:
                tf[i, self.vocab[w]] += 1
        self.idf = np.log((1 + len(toks)) / (1 + (tf > 0).sum(0))) + 1.0
        m = tf * self.idf
        self.doc_vecs = m / np.linalg.norm(m, axis=1, keepdims=True)

    def retrieve(self, query: str) -> list[int]:
        """Indices of the top_k documents for the query (ties: document order)."""
        q = np.zeros(len(self.vocab))
        for w in _tokens(query):
            if w in self.vocab:
                q[self.vocab[w]] += 1
        q = q * self.idf
        if not q.any():
            return []
        s = self.doc_vecs @ (q / np.linalg.norm(q))
        return [int(i) for i in np.argsort(-s, kind="stable")[:self.top_k] if s[i] > 0]

    # --- protocol ----------------------------------------------------------------------------------
    def admissible_actions(self) -> list[str]:
        return [f"search {e}" for e in self.seen] + [f"answer {e}" for e in self.candidates]

    def _info(self, valid: bool) -> dict:
        return dict(admissible_actions=self.admissible_actions(), task=self.task, won=self.won, valid=valid,
                    task_type=f"{self.hops}-hop")

    def step(self, action: str):
        if self.done or self.steps >= self.max_steps:
            return "The episode is over.", 0.0, True, self._info(False)
        self.steps += 1
        act = " ".join(action.split()).lower() if isinstance(action, str) else ""
        verb, _, arg = act.partition(" ")
        reward = 0.0
        if verb == "search" and _tokens(arg):
            hits = self.retrieve(arg)
            for i in hits:  # every entity named in a retrieved document becomes searchable / answerable
                for e in self.entities:
                    if e in self.docs[i] and e not in self.candidates:
                        self.candidates.append(e)
                    if e in self.docs[i] and e not in self.seen:
                        self.seen.append(e)
            found = " ".join(f"[{k + 1}] {self.docs[i]}" for k, i in enumerate(hits)) or "no documents found."
            obs, valid = f"Results for {' '.join(_tokens(arg)[:12])}: {found}", True
        elif verb == "answer" and _tokens(arg):
            self.won, self.done = normalize_answer(arg) == normalize_answer(self.answer), True
            reward = self.R_max if self.won else 0.0
            obs, valid = f"You answered {' '.join(_tokens(arg)[:12])}. " + ("Correct! You won!" if self.won else "Wrong."), True
        else:
            obs, valid = "Nothing happens. Use search <query> or answer <text>.", False
        done = self.done or self.steps >= self.max_steps
        return obs, reward, done, self._info(valid)

    def vocabulary_text(self) -> list[str]:
        return [" ".join(SQ_FIRST + SQ_LAST + SQ_CITIES + SQ_COUNTRIES + SQ_COMPANIES + SQ_JOBS),
                "is a was born in city company founded by based Results for : [1] [2] [3] [4] no documents found.",
                "You answered Correct! You won! Wrong. Nothing happens. Use search <query> or answer <text>.",
                "Question: Search the knowledge base, then answer. answer the question: in which country who founded",
                "where was the founder of born? is based? The episode is over."]


class SearchTinySparse(SearchTiny):
    """search-tiny's sparse variant: two-hop questions only, a bigger knowledge base, four documents per
    search (more distractor candidates to answer), a longer horizon."""
    name = "search-tiny-sparse"
    max_steps = 8
    two_hop_prob = 1.0
    top_k = 4
    sizes = dict(people=10, cities=10, countries=6, companies=6)


# ----------------------------------------------------------------------------------------------------
# textworld:<games>: real TextWorld games (Microsoft TextWorld, an optional dependency), one game per seed.
# ----------------------------------------------------------------------------------------------------
TW_GAME_EXTS = (".z8", ".ulx")
TW_UNLISTED = ("look", "inventory", "examine ")  # understood (valid) but not offered: they change nothing


def textworld_game_sets(spec: str) -> tuple[list[str], list[str]]:
    """The training and held-out game files of `--env textworld:<spec>`. <spec> is a folder with train/
    and eval/ subfolders (what `python envs.py textworld-games` makes), or a folder or glob of game files:
    then, sorted by name, every 4th game is held out. Raises EnvError when either set would be empty."""
    import glob
    path = os.path.expanduser(spec)

    def games(pattern_or_dir: str) -> list[str]:
        files = (glob.glob(os.path.join(pattern_or_dir, "*")) if os.path.isdir(pattern_or_dir)
                 else glob.glob(pattern_or_dir))
        return sorted(os.path.abspath(f) for f in files if f.endswith(TW_GAME_EXTS))

    if os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "eval")):
        train, held = games(os.path.join(path, "train")), games(os.path.join(path, "eval"))
    else:
        every = games(path)
        train = [g for i, g in enumerate(every) if i % 4 != 3]
        held = [g for i, g in enumerate(every) if i % 4 == 3]
    if not train or not held:
        raise EnvError(f"--env textworld:{spec}: found {len(train)} training and {len(held)} held-out games "
                       f"({', '.join(TW_GAME_EXTS)}); give a folder with train/ and eval/ subfolders or at least "
                       f"4 games. Make a set with: python envs.py textworld-games {spec} --train 50 --eval 20")
    return train, held


def textworld_env_class(spec: str):
    """The environment class of `--env textworld:<spec>`: TextWorldGames bound to that game set."""
    try:
        import textworld  # noqa: F401 - optional: only this environment needs it
    except ImportError:
        raise EnvError("--env textworld:... needs the optional package textworld: pip install textworld==1.7.0") from None
    import warnings  # jericho (TextWorld's z-machine) warns that it cannot list valid actions for TextWorld's own
    # games on some resets; TextWorld lists the admissible commands itself, so the warning is noise
    warnings.filterwarnings("ignore", message="Unable to find valid actions in an unsupported game")
    train, held = textworld_game_sets(spec)
    return type("TextWorldGames", (TextWorldGames,), dict(name=f"textworld:{spec}", train_games=train, eval_games=held))


def _tw_clean(text: str) -> str:
    """TextWorld's feedback without its command-prompt/status line ("> ... -= Room =-0/3"), on one line."""
    text = re.split(r"\n>", text or "")[0]
    return " ".join(text.split())


class TWState(NamedTuple):
    """What the adapter keeps of a TextWorld GameState (cleaned text, commands, score, outcome)."""
    feedback: str
    description: str
    inventory: str
    admissible_commands: tuple
    score: float
    max_score: float
    won: bool
    lost: bool
    objective: str


_TW_CACHE: "OrderedDict[tuple, TWState]" = OrderedDict()  # (game, commands...) -> state, least recently used first


class TextWorldGames:
    """Real TextWorld games behind paw's protocol. The seed picks the game: a training seed s plays
    train_games[s % n], a held-out seed (>= EVAL_SEED_START) plays eval_games[(s - EVAL_SEED_START) % m], so
    the two sets never share a game. A game is deterministic, so all G rollouts of a group start alike.
      task        the game's objective text
      observation the engine's feedback (its prompt/status line removed), then the room description unless the
                  feedback already holds it, then the inventory: the same state always reads the same, and
                  the ASCII banner of the reset feedback never appears (the first observation is description +
                  inventory)
      actions     the engine's admissible commands without look, inventory and examine (understood and
                  valid, but they change nothing and the observation already shows what they would)
      valid       the command was one of the engine's admissible commands; anything else is not sent to
                  the engine ("Nothing happens.", state unchanged)
      reward      the score gained, divided by the game's max score, so R_max = 1 on every game
      done        won, lost, or max_steps
    Engine time: a game is deterministic, so every state is cached by (game, commands played) for the whole
    process (`cache_size` states, least recently used dropped first; 0 = off); the G rollouts of a group share
    their first steps and a greedy evaluation replays the same episode per game, so most steps never reach the
    engine. An instance starts its engine only on a cache miss, keeps it open across resets of the same game
    and closes it when the instance goes."""

    name = "textworld"
    max_steps = 16
    R_max = 1.0
    text_episodes = 200  # random episodes for the tokenizer's text (a real engine step costs ~5-10 ms)
    cache_size = 50_000  # states cached per process (~1-2 kB each)
    train_games: list = []
    eval_games: list = []

    def game_for_seed(self, seed: int) -> str:
        seed = int(seed)
        if seed >= EVAL_SEED_START:
            return self.eval_games[(seed - EVAL_SEED_START) % len(self.eval_games)]
        return self.train_games[seed % len(self.train_games)]

    def _open(self, path: str):
        """This instance's engine, on game `path` (started on first need; one game at a time)."""
        import weakref
        import textworld
        if getattr(self, "_engine_path", None) != path:
            if getattr(self, "_closer", None) is not None:
                self._closer()
            infos = textworld.EnvInfos(admissible_commands=True, objective=True, won=True, lost=True,
                                       description=True, inventory=True, max_score=True, score=True)
            self._engine = textworld.start(path, request_infos=infos)
            self._closer = weakref.finalize(self, self._engine.close)
            self._engine_path, self._synced = path, -1
        return self._engine

    def _played(self, commands: tuple) -> TWState:
        """The state after `commands` (admissible ones, from the start of the current game). A game is
        deterministic, so a state seen before comes from the process-wide cache; otherwise the engine is
        brought there (reset, then the commands it has not played yet) and plays the last one."""
        key = (self._path,) + commands
        if key in _TW_CACHE:
            _TW_CACHE.move_to_end(key)
            return _TW_CACHE[key]
        engine = self._open(self._path)
        if self._synced < 0:  # not reset since this episode began
            gs, self._synced = engine.reset(), 0
        for c in commands[self._synced:]:
            gs, _, _ = engine.step(c)
        self._synced = len(commands)
        state = TWState(_tw_clean(gs.feedback), _tw_clean(gs.description), _tw_clean(gs.inventory),
                        tuple(gs.admissible_commands), float(gs.score), float(gs.max_score), bool(gs.won),
                        bool(gs.lost), _tw_clean(gs.objective))
        if self.cache_size > 0:
            _TW_CACHE[key] = state
            while len(_TW_CACHE) > self.cache_size:
                _TW_CACHE.popitem(last=False)
        return state

    def reset(self, seed: int):
        self._path = self.game_for_seed(seed)
        self._hist, self._synced = [], -1
        self._state = self._played(())
        self.steps, self.score, self.done, self.won = 0, 0.0, False, self._state.won
        return self._obs(""), self._info(valid=True)

    def _obs(self, feedback: str) -> str:
        desc, inv = self._state.description, self._state.inventory
        parts = [feedback] + ([desc] if desc not in feedback else []) + [inv]
        return " ".join(p for p in parts if p)

    def admissible_actions(self) -> list[str]:
        return [a for a in self._state.admissible_commands if not (a + " ").startswith(TW_UNLISTED)]

    def _info(self, valid: bool) -> dict:
        return dict(admissible_actions=self.admissible_actions(), task=self._state.objective, won=self.won,
                    valid=valid, game=os.path.basename(self._path))

    def step(self, action: str):
        if self.done:
            return "The game is over.", 0.0, True, self._info(valid=False)
        self.steps += 1
        act = " ".join(action.split()) if isinstance(action, str) else ""
        valid = act in self._state.admissible_commands
        reward = 0.0
        if valid:
            self._state = self._played(tuple(self._hist) + (act,))
            self._hist.append(act)
            reward = (self._state.score - self.score) / max(1.0, self._state.max_score)
            self.score, self.won = self._state.score, self._state.won
            feedback = self._state.feedback
        else:
            feedback = "Nothing happens."
        self.done = self._state.won or self._state.lost or self.steps >= self.max_steps
        return self._obs(feedback), float(reward), self.done, self._info(valid=valid)

    def vocabulary_text(self) -> list[str]:
        """The opening text (objective, description, inventory), every command of the first state, and every
        entity, verb and command-template word of every game, training and held-out: the words a pretrained
        model's vocabulary would hold anyway. No transition is played, so nothing here tells how a game
        answers an action."""
        import textworld
        out = ["Nothing happens. The game is over. You are carrying nothing."]
        for path in self.train_games + self.eval_games:
            self._path, self._hist, self._synced = path, [], -1
            s = self._played(())
            out += [s.objective, s.description, s.inventory, " ; ".join(s.admissible_commands)]
            names = textworld.start(path, request_infos=textworld.EnvInfos(entities=True, verbs=True,
                                                                           command_templates=True))
            try:  # every object, verb and command word, so no admissible action holds an [UNK]
                first = names.reset()
                templates = [re.sub(r"\{[^}]*\}", " ", t) for t in first.command_templates]  # "unlock {c} with {k}"
                out.append(" ".join(list(first.entities) + list(first.verbs) + templates))
            finally:
                names.close()
        return out


# ----------------------------------------------------------------------------------------------------
# key-vault: a held-out game for "does the recipe transfer?" Not registered and never tuned on: it is run as a
# user's own environment would be (`--env envs:KeyVault`), so it gets the default interface of an unknown env.
# ----------------------------------------------------------------------------------------------------
KV_ROOMS = ["foyer", "gallery", "library", "vault room", "workshop", "armory", "chapel"]
KV_ITEMS = ["lamp", "rope", "map", "helmet", "shovel"]


class KeyVault:
    """3-5 rooms in a row; a brass key lies in one of them, a locked vault stands in another, some junk lies
    around. Win by unlocking the vault with the key, opening it and taking the gold. Reward 1 on success."""

    max_steps = 20
    R_max = 1.0

    def reset(self, seed: int):
        rng = random.Random(int(seed) * 7919 + 13)
        self.rooms = rng.sample(KV_ROOMS, rng.randint(3, 5))
        self.key_room, self.vault_room = rng.sample(range(len(self.rooms)), 2)
        self.junk = {i: [] for i in range(len(self.rooms))}
        for item in rng.sample(KV_ITEMS, 2):
            self.junk[rng.randrange(len(self.rooms))].append(item)
        self.here, self.carry, self.locked, self.open, self.won, self.t = rng.randrange(len(self.rooms)), [], True, \
            False, False, 0
        return self._obs("You wake up."), self._info(True)

    def actions(self) -> list[str]:
        acts = (["go left"] if self.here > 0 else []) + (["go right"] if self.here < len(self.rooms) - 1 else [])
        acts += [f"take {x}" for x in self.junk[self.here]]
        if self.here == self.key_room and "key" not in self.carry:
            acts.append("take key")
        acts += [f"drop {x}" for x in self.carry]
        if self.here == self.vault_room:
            if self.locked and "key" in self.carry:
                acts.append("unlock vault")
            elif not self.locked and not self.open:
                acts.append("open vault")
            elif self.open:
                acts.append("take gold")
        return acts

    def _obs(self, feedback: str) -> str:
        things = list(self.junk[self.here]) + (["a brass key"] if self.here == self.key_room and "key" not in self.carry
                                               else [])
        vault = (" A vault stands here, " + ("locked." if self.locked else "open." if self.open else "closed.")
                 if self.here == self.vault_room else "")
        return (f"{feedback} You are in the {self.rooms[self.here]}.{vault} You see "
                f"{', '.join(things) if things else 'nothing'}. You hold {', '.join(self.carry) or 'nothing'}.")

    def _info(self, valid: bool) -> dict:
        return dict(admissible_actions=self.actions(), task="unlock the vault and take the gold", won=self.won,
                    valid=valid)

    def step(self, action):
        if self.won or self.t >= self.max_steps:
            return "The game is over.", 0.0, True, self._info(False)
        self.t += 1
        act = " ".join(action.split()) if isinstance(action, str) else ""
        if act not in self.actions():
            return self._obs("Nothing happens."), 0.0, self.t >= self.max_steps, self._info(False)
        verb, _, what = act.partition(" ")
        if act == "go left" or act == "go right":
            self.here += -1 if act == "go left" else 1
        elif act == "take key":
            self.carry.append("key")
        elif act == "take gold":
            self.won = True
        elif verb == "take":
            self.junk[self.here].remove(what), self.carry.append(what)
        elif verb == "drop":
            self.carry.remove(what)
            if what == "key":
                self.key_room = self.here
            else:
                self.junk[self.here].append(what)
        elif act == "unlock vault":
            self.locked = False
        elif act == "open vault":
            self.open = True
        feedback = "You win the gold!" if self.won else f"You {act}."
        return self._obs(feedback), float(self.won), self.won or self.t >= self.max_steps, self._info(True)

    def vocabulary_text(self) -> list[str]:
        return [" ".join(KV_ROOMS + KV_ITEMS) + " a brass key locked open closed vault stands here nothing You "
                "hold see are in the wake up win gold Nothing happens. The game is over. go left right take drop "
                "unlock"]


# ----------------------------------------------------------------------------------------------------
# Registry and loading of user environments (`--env module:Class`)
# ----------------------------------------------------------------------------------------------------
ENVS = {c.name: c for c in (TextWorldTiny, TextWorldTinySparse, AlfWorldTiny, AlfWorldTinySparse, WebShopTiny,
                             WebShopTinySparse, SearchTiny, SearchTinySparse)}


class GoalNamesAbstracted:
    """An environment with its goal names abstracted (entity anonymisation, as in reading-comprehension data):
    the names the task refers to (the env's `goal_names()`, e.g. {"apple": "OBJ", "fridge": "REC"}) are written
    as placeholder words everywhere the agent reads (task, observations, admissible actions, decision points),
    and the agent's actions are mapped back one-to-one before they reach the game. The game, its rewards and
    its success are unchanged. Why: a small model from scratch spends most of its learning on matching the
    task's names against the text (docs/method.md, "Agent interface"); a pretrained LM reads names already.
    Make one with `abstract_goal_names(env_cls)`; an env without goal_names() is returned as it is."""

    inner_cls: type = None

    def __init__(self):
        self.inner = self.inner_cls()
        self.forward_map: dict = {}

    @staticmethod
    def _pattern(words) -> re.Pattern:
        alts = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # longest name first
        return re.compile(rf"(?<![\w-])({alts})(?![\w-])")

    def _out(self, text: str) -> str:
        return self._to.sub(lambda m: self.forward_map[m.group(1)], text) if self.forward_map else text

    def _info(self, info: dict) -> dict:
        return dict(info, task=self._out(info["task"]), admissible_actions=[self._out(a) for a in
                                                                            info["admissible_actions"]])

    def reset(self, seed: int):
        obs, info = self.inner.reset(seed)
        names = dict(self.inner.goal_names())
        if len(set(names.values())) != len(names):
            raise EnvFailure(f"{self.name}: goal_names() must map names to distinct placeholders: {names}")
        self.forward_map, self.back_map = names, {v: k for k, v in names.items()}
        self._to, self._back = self._pattern(names), self._pattern(self.back_map)
        return self._out(obs), self._info(info)

    def step(self, action):
        real = self._back.sub(lambda m: self.back_map[m.group(1)], action) if isinstance(action, str) else action
        obs, reward, done, info = self.inner.step(real)
        return self._out(obs), reward, done, self._info(info)

    def vocabulary_text(self) -> list[str]:  # the placeholders are in every task, so random play finds them
        return list(getattr(self.inner, "vocabulary_text", lambda: [])())

    def _decision_points(self) -> dict:
        return {k: [self._out(a) for a in v] for k, v in self.inner.decision_points().items()}


def abstract_goal_names(env_cls):
    """env_cls with its goal names abstracted (GoalNamesAbstracted), or env_cls itself if it declares no
    `goal_names()`. Same name, max_steps, R_max and text_episodes; decision_points() only if env_cls has it."""
    if not callable(getattr(env_cls, "goal_names", None)):
        return env_cls
    attrs = dict(inner_cls=env_cls, name=getattr(env_cls, "name", env_cls.__name__), max_steps=env_cls.max_steps,
                 R_max=env_cls.R_max, text_episodes=getattr(env_cls, "text_episodes", 1000), goal_names_abstracted=True)
    if hasattr(env_cls, "decision_points"):
        attrs["decision_points"] = GoalNamesAbstracted._decision_points
    return type(env_cls.__name__ + "Abstracted", (GoalNamesAbstracted,), attrs)


class EnvError(ValueError):
    """An environment name or class that cannot be used; the message says why."""


class EnvFailure(RuntimeError):
    """An environment broke the protocol (or raised) during a run: a bug in the environment. The message
    is one line naming the environment, the seed, the step and what was wrong."""


MAX_OBS_CHARS = 20_000  # a longer observation is a bug (it would freeze tokenization and blow up prompts)


def checked(cls, name: str):
    """`cls` with every reset/step checked against the protocol, cheaply, on every call. A violation at
    any point of a run (tokenizer text, warm-up, baseline, rollouts, evaluation) raises EnvFailure with
    one line; numpy numbers are accepted as rewards."""
    if getattr(cls, "_paw_checked", False):
        return cls

    class Checked(cls):
        _paw_checked = True

        def _fail(self, what: str):
            raise EnvFailure(f"environment {name}, seed {self._seed}, step {self._t}: {what}") from None

        def _check(self, obs, info, where: str):
            if not isinstance(obs, str):
                self._fail(f"{where} returned a non-string observation ({type(obs).__name__})")
            if len(obs) > MAX_OBS_CHARS:
                self._fail(f"{where} returned an observation of {len(obs)} characters (at most {MAX_OBS_CHARS})")
            try:
                _check_info(info, where, name)
            except EnvError as err:
                self._fail(str(err).split(": ", 1)[1])

        def reset(self, seed):
            self._seed, self._t = seed, 0
            try:
                out = super().reset(seed)
                obs, info = out
            except EnvFailure:
                raise
            except Exception as err:  # noqa: BLE001 - a user env that raises is a bug in the env, say so
                self._fail(f"reset raised {type(err).__name__}: {str(err)[:200]}")
            self._check(obs, info, "reset")
            return obs, info

        def step(self, action):
            self._t += 1
            try:
                out = super().step(action)
                obs, reward, done, info = out
            except EnvFailure:
                raise
            except Exception as err:  # noqa: BLE001
                self._fail(f"step({str(action)[:60]!r}) raised {type(err).__name__}: {str(err)[:200]}")
            if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(reward):
                self._fail(f"step returned reward {reward!r}: it must be a finite number")
            self._check(obs, info, "step")
            return obs, float(reward), bool(done), info

    Checked.__name__ = Checked.__qualname__ = cls.__name__
    return Checked


def env_slug(env: str) -> str:
    """An --env value as part of a file or run name (textworld:<folder> holds a path)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", env.replace(":", ".")).strip("_.")[-40:]


def load_env_class(name: str):
    """A built-in name or `module:Class` (module importable from the working directory or PYTHONPATH),
    checked against the protocol once here and on every call after (see `checked`)."""
    if name in ENVS:
        return checked(ENVS[name], name)
    if name.startswith("textworld:"):  # real TextWorld games (the package named textworld is never a user module)
        return checked(textworld_env_class(name.partition(":")[2]), name)
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
    return checked(cls, name)


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
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real):
        raise EnvError(f"{name}: step() returned a non-numeric reward ({type(reward).__name__})")
    _check_info(info, "step", name)


class RandomEpisode(NamedTuple):
    won: bool
    task: str
    task_type: str
    observations: list  # o_0 (after reset), o_1, ...
    offered: list       # the admissible actions of each state an action was drawn in


def random_episode(env, seed: int, rng: random.Random, invalid_prob: float | None = None,
                   max_obs: int = 0) -> RandomEpisode:
    """One episode of the uniformly random admissible-action policy from env.reset(seed). invalid_prob: the chance of
    an inadmissible action ("xyzzy") per step; None = never, with no random draw for it, and a state without
    admissible actions ends the episode. max_obs > 0: stop once that many observations are collected."""
    obs, info = env.reset(seed)
    first, observations, offered = info, [obs], []
    for _ in range(env.max_steps):
        acts = info["admissible_actions"]
        if (invalid_prob is None and not acts) or (max_obs and len(observations) >= max_obs):
            break
        a = "xyzzy" if (invalid_prob is not None and rng.random() < invalid_prob) or not acts else rng.choice(acts)
        offered.append(acts)
        obs, _, done, info = env.step(a)
        observations.append(obs)
        if done:
            break
    return RandomEpisode(bool(info.get("won", False)), first["task"], str(first.get("task_type", "")), observations,
                         offered)


def random_policy_success(env_cls, n: int, seed: int = 0) -> dict:
    """The uniformly random admissible-action policy on the n held-out seeds: success, and per task type."""
    rng, env = random.Random(seed), env_cls()
    eps = [random_episode(env, EVAL_SEED_START + i, rng, invalid_prob=0.0) for i in range(n)]
    out = dict(success=float(np.mean([e.won for e in eps])))
    for t in sorted({e.task_type for e in eps} - {""}):
        out[f"success/{t}"] = float(np.mean([e.won for e in eps if e.task_type == t]))
    return out


def env_text(env_cls, n_episodes: int = 0, seed: int = 0) -> tuple[list[str], list[str]]:
    """What an agent reads in this environment, for a tokenizer: random rollouts on training seeds (10% inadmissible
    actions), plus the env's `vocabulary_text()` if it has one (else unseen words become [UNK]). n_episodes = 0:
    the class's `text_episodes`, else 1000. -> (texts, the admissible action strings seen, sorted)."""
    rng, env, texts, actions = random.Random(seed), env_cls(), [], set()
    for _ in range(n_episodes or getattr(env_cls, "text_episodes", 1000)):
        ep = random_episode(env, rng.randrange(EVAL_SEED_START), rng, invalid_prob=0.1)
        texts += [ep.observations[0], ep.task] + ep.observations[1:]
        actions.update(a for acts in ep.offered for a in acts)
    return texts + (list(env.vocabulary_text()) if hasattr(env, "vocabulary_text") else []), sorted(actions)


def random_observations(env_cls, n: int, rng: random.Random) -> list[str]:
    """n observations of random-policy episodes on training seeds, each a text of its own."""
    env, texts = env_cls(), []
    while len(texts) < n:
        texts += random_episode(env, rng.randrange(EVAL_SEED_START), rng, max_obs=n - len(texts)).observations
    return texts


# ----------------------------------------------------------------------------------------------------
# A reproducible TextWorld game set: `python envs.py textworld-games <folder> --train 50 --eval 20`
# ----------------------------------------------------------------------------------------------------
def make_textworld_games(folder: str, n_train: int, n_eval: int, world_sizes=(2, 3), quest_lengths=(2, 3),
                         nb_objects: int = 3, seed: int = 0, jobs: int = 2, log=print) -> dict:
    """Generate <folder>/train/ and <folder>/eval/ with TextWorld's own generator (`tw-make custom`, no
    download). Game i uses seed + i, its world size and quest length drawn from Random(seed + i); a seed the
    generator cannot make a quest for is skipped (the next one is tried). Every command run is written to
    <folder>/manifest.json (run in <folder>), so the set can be rebuilt by hand. Existing games are kept (resumable)."""
    import json
    import shutil
    import subprocess
    from concurrent.futures import ThreadPoolExecutor
    tw_make = shutil.which("tw-make") or os.path.join(os.path.dirname(sys.executable), "tw-make")
    if not os.path.exists(tw_make):
        raise EnvError("tw-make not found: pip install textworld==1.7.0")

    def command(i: int, part: str) -> list[str]:
        rng = random.Random(seed + i)
        ws, ql = rng.choice(list(world_sizes)), rng.choice(list(quest_lengths))
        out = f"{part}/tw-s{seed + i}-w{ws}-q{ql}.z8"  # relative: the commands are run in <folder>
        return ["tw-make", "custom", "--world-size", str(ws), "--nb-objects", str(nb_objects), "--quest-length",
                str(ql), "--seed", str(seed + i), "--output", out, "--silent", "-f"]

    def make(cmd: list[str]) -> bool:
        if os.path.exists(os.path.join(folder, cmd[cmd.index("--output") + 1])):
            return True
        return subprocess.run([tw_make] + cmd[1:], capture_output=True, cwd=folder).returncode == 0

    made, i = {"train": [], "eval": []}, 0
    for part, n in (("train", n_train), ("eval", n_eval)):
        os.makedirs(os.path.join(folder, part), exist_ok=True)
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            while len(made[part]) < n:
                cmds = [command(i + k, part) for k in range(n - len(made[part]))]
                i += len(cmds)
                for cmd, ok in zip(cmds, pool.map(make, cmds)):
                    if ok:
                        made[part].append(" ".join(cmd))
                    else:
                        log(f"skipped seed {cmd[cmd.index('--seed') + 1]}: tw-make found no quest")
                log(f"{part}: {len(made[part])}/{n} games")
    manifest = dict(generator=f"textworld {__import__('textworld').__version__}", commands=made)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="make a TextWorld game set for paw's --env textworld:<folder>")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tg = sub.add_parser("textworld-games", help="generate <folder>/train and <folder>/eval with tw-make custom")
    tg.add_argument("folder")
    tg.add_argument("--train", type=int, default=50, help="training games")
    tg.add_argument("--eval", type=int, default=20, help="held-out games")
    tg.add_argument("--world-size", type=int, nargs="+", default=[2, 3], help="rooms, drawn per game")
    tg.add_argument("--quest-length", type=int, nargs="+", default=[2, 3], help="winning actions, drawn per game")
    tg.add_argument("--nb-objects", type=int, default=3)
    tg.add_argument("--seed", type=int, default=0, help="game i uses seed + i")
    tg.add_argument("--jobs", type=int, default=2, help="tw-make processes at a time")
    a = ap.parse_args()
    try:
        make_textworld_games(a.folder, a.train, a.eval, a.world_size, a.quest_length, a.nb_objects, a.seed, a.jobs)
    except (EnvError, ImportError) as e:
        sys.exit(f"error: {e}")
    print(f"done: python paw.py --env textworld:{a.folder}")
