"""make_env and the Collector: seeding, action encoding, and exactly one stored row per real transition."""

from __future__ import annotations

import random

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worldmodel import Collector, ConfigError, EnvSpec, RandomPolicy, ReplayBuffer, env_spec, make_env
from worldmodel.rollout import StickyRandomPolicy
from worldmodel.runtime import seed_everything


def collect(env_id: str, steps: int, seed: int = 0) -> ReplayBuffer:
    env = make_env(env_id, seed=seed)
    spec = env_spec(env)
    buffer = ReplayBuffer(10_000, spec.obs_dim, spec.action_dim, seed=seed)
    Collector(env, buffer, RandomPolicy(env.action_space, seed), seed=seed).collect(steps)
    return buffer


def test_same_seed_same_stream_and_different_seed_differs():
    a, b, c = collect("CartPole-v1", 300, 0), collect("CartPole-v1", 300, 0), collect("CartPole-v1", 300, 1)
    for key in a[:]:
        np.testing.assert_array_equal(a[:][key], b[:][key])
    assert not np.array_equal(a[:]["obs"], c[:]["obs"])


def test_discrete_actions_are_one_hot_and_box_actions_are_vectors():
    cart = collect("CartPole-v1", 50)[:]["action"]
    assert cart.shape == (50, 2) and set(np.unique(cart)) <= {0.0, 1.0} and (cart.sum(1) == 1).all()
    pend = collect("Pendulum-v1", 50)[:]["action"]
    assert pend.shape == (50, 1) and np.abs(pend).max() <= 2.0 and len(np.unique(pend)) > 40


def test_transitions_chain_within_episodes_and_keep_the_final_observation():
    """Replays the same seeded env by hand and compares: the reset step after an episode end is never stored as a
    transition, and an episode's last row holds the true final observation returned with terminated/truncated."""
    buffer = collect("CartPole-v1", 400, seed=3)
    rows = buffer[:]
    env = make_env("CartPole-v1", seed=3)
    obs, _ = env.reset(seed=3)
    ends = 0
    for t in range(400):
        action = int(np.argmax(rows["action"][t]))
        np.testing.assert_array_equal(rows["obs"][t], obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        np.testing.assert_array_equal(rows["next_obs"][t], next_obs)
        assert (rows["terminated"][t], rows["truncated"][t]) == (terminated, truncated)
        assert rows["reward"][t] == reward
        if terminated or truncated:
            ends += 1
            obs, _ = env.reset()
            assert not np.array_equal(rows["next_obs"][t], obs)  # final obs, not the reset obs
        else:
            obs = next_obs
    assert ends >= 5  # random CartPole episodes last ~20 steps, so the check crossed many boundaries


def test_terminated_and_truncated_are_kept_apart():
    rows = collect("Pendulum-v1", 450)[:]  # Pendulum never terminates; its time limit truncates at 200
    assert not rows["terminated"].any()
    assert np.flatnonzero(rows["truncated"]).tolist() == [199, 399]
    cart = collect("CartPole-v1", 500)[:]
    assert cart["terminated"].any() and not (cart["terminated"] & cart["truncated"]).any()


def test_collector_continues_an_episode_across_calls():
    env = make_env("Pendulum-v1", seed=0)
    spec = env_spec(env)
    split = ReplayBuffer(1000, spec.obs_dim, spec.action_dim)
    collector = Collector(env, split, RandomPolicy(env.action_space, 0), seed=0)
    stats = [collector.collect(n) for n in (7, 0, 150, 143)]
    whole = collect("Pendulum-v1", 300)
    np.testing.assert_array_equal(split[:]["obs"], whole[:]["obs"])
    assert sum(s.steps for s in stats) == collector.total_steps == 300
    assert [len(s.episode_returns) for s in stats] == [0, 0, 0, 1] and stats[3].episode_lengths == [200]


def test_unsupported_spaces_are_refused_with_the_key():
    with pytest.raises(ConfigError, match="env.id.*Box"):
        make_env("FrozenLake-v1", seed=0)
    with pytest.raises(ConfigError, match="registered gymnasium id"):
        make_env("NotAnEnv-v0", seed=0)


def test_max_episode_steps_override():
    env = make_env("Pendulum-v1", seed=0, max_episode_steps=25)
    spec = env_spec(env)
    buffer = ReplayBuffer(100, spec.obs_dim, spec.action_dim)
    Collector(env, buffer, RandomPolicy(env.action_space, 0), seed=0).collect(60)
    assert np.flatnonzero(buffer[:]["truncated"]).tolist() == [24, 49]
    assert isinstance(env.action_space, gym.spaces.Box)


@pytest.mark.parametrize("policy", [RandomPolicy, StickyRandomPolicy])  # sticky: its own __call__, drawn per step
@given(
    space=st.sampled_from([
        gym.spaces.MultiDiscrete([2, 2, 2]),
        gym.spaces.MultiDiscrete([3, 5], start=[-1, 2]),
        gym.spaces.Box(-2.0, 2.0, (4, 1), np.float32),
        gym.spaces.Box(np.array([-1.0, 0.0]), np.array([1.0, 5.0]), dtype=np.float64),
        gym.spaces.Box(-np.inf, 1.0, (3,), np.float32),  # not bounded: drawn step by step
        gym.spaces.Discrete(4),
    ]),
    seed=st.integers(0, 2**31 - 1),
    steps=st.integers(1, 40),
)
@settings(max_examples=60, deadline=None)
def test_random_policy_block_equals_single_draws(policy, space, seed, steps):
    """actions(steps) is bit for bit `steps` calls, and leaves the RNG where they would (so later draws, a
    checkpoint's RNG state and a resumed run do not depend on which one the collector used)."""
    block, single = policy(space, seed), policy(space, seed)
    drawn = block.actions(steps)
    expected = np.stack([single(None) for _ in range(steps)])
    assert drawn.dtype == expected.dtype and drawn.shape == expected.shape
    np.testing.assert_array_equal(drawn, expected)
    assert block.state_dict() == single.state_dict()
    np.testing.assert_array_equal(block(None), single(None))


@pytest.mark.parametrize("num_envs", [1, 3])
def test_a_keyword_the_env_does_not_take_names_env_kwargs(num_envs):
    with pytest.raises(ConfigError) as err:
        make_env("Pendulum-v1", seed=0, kwargs={"gravity": 9.81}, num_envs=num_envs)  # Pendulum takes g, not gravity
    assert err.value.key == "env.kwargs" and "gravity" in str(err.value)
    assert make_env("Pendulum-v1", seed=0, kwargs={"g": 9.81}, num_envs=num_envs) is not None


class _BuggyEnv(gym.Env):
    def __init__(self, size: int = 3):
        len(size)  # a bug of the env's own: a TypeError that has nothing to do with the keywords given


def test_an_envs_own_type_error_is_not_blamed_on_env_kwargs():
    gym.register(id="BuggyTypeError-v0", entry_point=_BuggyEnv)
    for kwargs in ({}, {"size": 4}):
        with pytest.raises(TypeError, match="has no len"):
            make_env("BuggyTypeError-v0", seed=0, kwargs=kwargs)


@pytest.mark.parametrize("num_envs", [1, 3])
def test_a_value_of_the_wrong_type_in_env_kwargs_is_named_before_the_run_steps(num_envs):
    """Pendulum's constructor takes g="abc" and fails only in its first step, inside the prefill."""
    with pytest.raises(ConfigError) as err:
        make_env("Pendulum-v1", seed=0, kwargs={"g": "abc"}, num_envs=num_envs)
    assert err.value.key == "env.kwargs" and "{'g': 'abc'}" in str(err.value) and "TypeError" in str(err.value)


class _FailsAtFirstStep(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,))
    action_space = gym.spaces.Discrete(2)

    def __init__(self, size: int = 3):
        self.size = size

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        raise ValueError("a bug of the env's own, whatever its options")


def test_an_env_that_fails_at_its_first_step_anyway_is_not_blamed_on_env_kwargs():
    gym.register(id="FailsAtFirstStep-v0", entry_point=_FailsAtFirstStep)
    with pytest.raises(ValueError, match="a bug of the env's own"):
        make_env("FailsAtFirstStep-v0", seed=0, kwargs={"size": 4})


class _DrawsFromGlobalRandomness(gym.Env):
    """Research code often draws from np.random / torch / random directly; one instance alive at a time (a port)."""

    observation_space = gym.spaces.Box(-10.0, 10.0, (2,))
    action_space = gym.spaces.Discrete(2)
    alive = 0

    def __init__(self, scale: float = 1.0):
        if _DrawsFromGlobalRandomness.alive:
            raise OSError("address already in use")
        _DrawsFromGlobalRandomness.alive += 1
        self.scale = scale

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        noise = np.random.uniform(size=2) + torch.rand(2).numpy() + random.random()
        return (self.scale * noise).astype(np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, False, False, {}

    def close(self):
        _DrawsFromGlobalRandomness.alive -= 1


def test_checking_env_kwargs_leaves_global_randomness_alone_and_never_holds_two_envs():
    """The check's throwaway env must not shift a seeded run's numbers, nor exist beside the run's own env."""
    gym.register(id="DrawsFromGlobalRandomness-v0", entry_point=_DrawsFromGlobalRandomness)
    seed_everything(0)
    expected = (np.random.uniform(), torch.rand(1).item(), random.random())
    seed_everything(0)
    env = make_env("DrawsFromGlobalRandomness-v0", seed=0, kwargs={"scale": 2.0})
    assert (np.random.uniform(), torch.rand(1).item(), random.random()) == expected
    env.close()


def test_checking_env_kwargs_does_not_start_cuda(monkeypatch):
    """collect.py and evaluate.py run on the host: saving the CUDA random streams would start CUDA (seconds, and
    memory on a shared GPU) just to check an option. Where CUDA is already up, its streams are saved as well."""
    read = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: read.append(1) or [])
    for initialised in (False, True):
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
        make_env("Pendulum-v1", seed=0, kwargs={"g": 9.0 + initialised}).close()
        assert len(read) == initialised


class _NeedsBox2D(gym.Env):
    def __init__(self):
        raise gym.error.DependencyNotInstalled('Box2D is not installed, run `pip install "gymnasium[box2d]"`')


class _MovedAway(gym.Env):
    def __init__(self, **kwargs):
        raise ImportError("The mujoco v2 and v3 based environments have been moved to the gymnasium-robotics project")


class _ShiftedActions(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,))
    action_space = gym.spaces.Discrete(2, start=1)


def test_an_env_whose_dependencies_are_missing_names_env_id():
    gym.register(id="NeedsBox2D-v0", entry_point=_NeedsBox2D)
    with pytest.raises(ConfigError) as err:
        make_env("NeedsBox2D-v0", seed=0)
    assert err.value.key == "env.id" and "dependencies are installed" in str(err.value) and "box2d" in str(err.value)


@pytest.mark.parametrize("kwargs", [None, {"frame_skip": 2}])
def test_an_env_that_raises_a_plain_import_error_names_env_id(kwargs):
    """gymnasium's MuJoCo v2/v3 and phys2d/ ids raise ImportError, not DependencyNotInstalled; with env.kwargs the
    first-step check meets it first."""
    gym.register(id="MovedAway-v0", entry_point=_MovedAway)
    with pytest.raises(ConfigError) as err:
        make_env("MovedAway-v0", seed=0, kwargs=kwargs)
    assert err.value.key == "env.id" and "dependencies are installed" in str(err.value) and "robotics" in str(err.value)


def test_discrete_actions_that_do_not_start_at_0_are_refused():
    """One-hot slots, datasets and policies count actions from 0: Discrete(2, start=1) would put action 2 out of
    range, and start=-1 would silently store action -1 in the last slot."""
    gym.register(id="ShiftedActions-v0", entry_point=_ShiftedActions)
    with pytest.raises(ConfigError, match=r"env.id.*start at 0.*Discrete\(2, start=1\)"):
        make_env("ShiftedActions-v0", seed=0)


def test_an_unsaved_env_on_resume_closes_the_open_episode_as_a_truncation():
    """Resuming without the env (it could not be pickled) starts a fresh episode; the one in progress must end as a
    truncation in the buffer, so no sampled window runs from the old episode into the new one."""
    env = make_env("Pendulum-v1", seed=0)
    spec = env_spec(env)
    buffer = ReplayBuffer(1000, spec.obs_dim, spec.action_dim, seed=0)
    collector = Collector(env, buffer, RandomPolicy(env.action_space, 0), seed=0)
    collector.collect(30)
    collector.load_state_dict({**collector.state_dict(), "env": None})
    rows = buffer[:]
    assert rows["truncated"][29] and not rows["truncated"][:29].any() and not rows["terminated"].any()
    collector.collect(20)
    rows = buffer[:]
    assert len(buffer) == 50 and not np.array_equal(rows["obs"][30], rows["next_obs"][29])  # a fresh episode
    cont = ~(rows["terminated"] | rows["truncated"])[:-1]  # rows chain wherever the episode did not end
    np.testing.assert_array_equal(rows["next_obs"][:-1][cont], rows["obs"][1:][cont])


def test_an_unsaved_env_resumed_into_an_empty_buffer_starts_a_fresh_episode():
    """With no stored row there is no open episode to close: the resume starts a fresh episode rather than failing on
    the update of a row that does not exist."""
    env = make_env("Pendulum-v1", seed=0)
    spec = env_spec(env)
    collector = Collector(env, ReplayBuffer(100, spec.obs_dim, spec.action_dim, seed=0),
                          RandomPolicy(env.action_space, 0), seed=0)  # fmt: skip
    collector.collect(5)
    buffer = ReplayBuffer(100, spec.obs_dim, spec.action_dim, seed=0)
    resumed = Collector(make_env("Pendulum-v1", seed=0), buffer, RandomPolicy(env.action_space, 0), seed=0)
    resumed.load_state_dict({**collector.state_dict(), "env": None})
    assert len(buffer) == 0
    resumed.collect(3)
    assert len(buffer) == 3 and not buffer[:]["truncated"].any()


@pytest.mark.parametrize(
    "space", [gym.spaces.Discrete(4), gym.spaces.Box(-2.0, 2.0, (1,), np.float32)], ids=["discrete", "box"]
)
def test_sticky_policy_repeats_its_action_with_the_given_probability(space):
    """scripts/collect.py's sticky policy holds an action with probability repeat_prob: at 0.9 nearly every step
    repeats the previous action, at 0.0 repeats happen only by chance (1/4 for Discrete(4), never for a Box)."""
    chance = 0.25 if isinstance(space, gym.spaces.Discrete) else 0.0

    def repeat_rate(repeat_prob: float) -> float:
        policy = StickyRandomPolicy(space, seed=7, repeat_prob=repeat_prob)
        actions = np.stack([np.asarray(policy(None)) for _ in range(2000)])
        return float(np.mean([np.array_equal(a, b) for a, b in zip(actions[:-1], actions[1:])]))

    held = repeat_rate(0.9)
    assert 0.85 < held < 0.96  # 0.9 + 0.1 x chance
    fresh = repeat_rate(0.0)
    assert chance - 0.05 <= fresh < chance + 0.05


@pytest.mark.parametrize(
    "space", [gym.spaces.Discrete(4), gym.spaces.Box(-2.0, 2.0, (1,), np.float32)], ids=["discrete", "box"]
)
def test_a_sticky_policy_restored_from_its_state_continues_with_the_same_actions(space):
    """The sticky policy's state is its RNG and the action it holds: a policy restored from a checkpoint (another
    seed, nothing held yet) must go on with exactly the actions of one that never stopped, repeating the held action
    where that one would, not drawing a fresh one."""
    run = StickyRandomPolicy(space, seed=3, repeat_prob=0.9)
    for _ in range(25):
        run(None)
    state = run.state_dict()
    expected = [np.asarray(run(None)) for _ in range(50)]
    resumed = StickyRandomPolicy(space, seed=99, repeat_prob=0.9)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(np.stack([np.asarray(resumed(None)) for _ in range(50)]), np.stack(expected))


def test_a_collector_restored_mid_episode_reports_the_whole_episodes_return_and_length():
    """A checkpoint 50 steps into a Pendulum episode (200 steps) resumes into a fresh collector, env and buffer that
    store the same rows and report the same episodes as a run that never stopped: the episode in progress counts its
    steps and reward from before the checkpoint too (length 200, not 150)."""

    def collector(seed: int) -> Collector:
        env = make_env("Pendulum-v1", seed=seed)
        spec = env_spec(env)
        buffer = ReplayBuffer(1000, spec.obs_dim, spec.action_dim, seed=seed)
        return Collector(env, buffer, RandomPolicy(env.action_space, seed), seed=seed)

    run = collector(0)
    run.collect(50)
    state, saved = run.state_dict(), run.buffer.state_dict()
    expected = run.collect(350)
    resumed = collector(99)  # another seed: everything must come from the checkpoint
    resumed.buffer.load_state_dict(saved)
    resumed.load_state_dict(state)
    stats = resumed.collect(350)
    assert expected.episode_lengths == [200, 200]
    assert (stats.episode_lengths, stats.episode_returns) == (expected.episode_lengths, expected.episode_returns)
    for key, value in run.buffer[:].items():
        np.testing.assert_array_equal(resumed.buffer[:][key], value, err_msg=key)
    assert resumed.total_steps == run.total_steps == 400


class _Spaces(gym.Env):
    """An env of the given spaces, read by env_spec only (never reset or stepped)."""

    def __init__(self, observation_space, action_space):
        self.observation_space, self.action_space = observation_space, action_space


def test_env_spec_flattens_observation_and_action_boxes_of_any_shape():
    image = gym.spaces.Box(-1.0, 1.0, (2, 3))
    assert env_spec(_Spaces(image, gym.spaces.Discrete(5))) == EnvSpec("_Spaces", 6, 5, discrete=True)
    assert env_spec(_Spaces(image, gym.spaces.Box(-1.0, 1.0, (2, 2)))) == EnvSpec("_Spaces", 6, 4, discrete=False)


@pytest.mark.parametrize("space", [gym.spaces.Discrete(3, start=-1), gym.spaces.MultiDiscrete([2, 3]),
                                   gym.spaces.MultiBinary(2)], ids=["start-1", "multidiscrete", "multibinary"])
def test_env_spec_refuses_actions_it_cannot_encode(space):
    """Discrete(3, start=-1) would store action -1 in the last one-hot slot; MultiDiscrete and MultiBinary have no
    encoding at all."""
    with pytest.raises(ConfigError, match="env.id"):
        env_spec(_Spaces(gym.spaces.Box(-1.0, 1.0, (2,)), space))


def test_encode_action_gives_float32_one_hots_and_flat_vectors_of_the_spec_width():
    one_hot = EnvSpec("x", 4, 3, discrete=True).encode_action(np.int64(2))
    assert one_hot.dtype == np.float32 and one_hot.tolist() == [0.0, 0.0, 1.0]
    box = EnvSpec("x", 4, 2, discrete=False)
    vector = box.encode_action(np.array([[0.5], [-1.0]]))
    assert vector.dtype == np.float32 and vector.tolist() == [0.5, -1.0]
    with pytest.raises(ValueError):  # an action of another width is a bug, not something to store
        box.encode_action(np.zeros(3))


def test_env_id_mistakes_get_a_suggestion_and_a_missing_package_the_path_hint():
    from worldmodel.env import check_env_id

    with pytest.raises(ConfigError, match="Did you mean CartPole-v1"):
        check_env_id("Cartpole-v1")
    # A package of one's own not on the path, named by its submodule: the same hint as a missing top-level module.
    with pytest.raises(ConfigError, match=r"must be on the path: PYTHONPATH=\. python"):
        check_env_id("no_such_package_xyz.envs:MyEnv-v0")


class _CountsInstances(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,))
    action_space = gym.spaces.Discrete(2)
    made = 0

    def __init__(self, scale: float = 1.0):
        _CountsInstances.made += 1

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, False, False, {}


def test_env_kwargs_are_checked_once_per_process_and_only_when_given(monkeypatch):
    """The throwaway env of the check is made for env.kwargs only (not for max_episode_steps alone), and once per id
    and options: the run's held-out env, made with the same ones, is not checked again."""
    monkeypatch.setattr("worldmodel.env._CHECKED", set())
    gym.register(id="CountsInstances-v0", entry_point=_CountsInstances)
    made = []
    cases = ((None, 5), ({}, None), ({"scale": 2.5}, None), ({"scale": 2.5}, None), ({"scale": 2.5}, 7), ({"scale": 2.5}, 7))
    for kwargs, steps in cases:
        before = _CountsInstances.made
        make_env("CountsInstances-v0", seed=0, kwargs=kwargs, max_episode_steps=steps).close()
        made.append(_CountsInstances.made - before)
    assert made == [1, 1, 2, 1, 2, 1]


def test_env_kwargs_blamed_for_a_failed_first_step_are_those_given():
    """max_episode_steps is make_env's own argument, not one of env.kwargs: it is neither named nor left out."""
    given = {"g": "abc"}
    with pytest.raises(ConfigError) as err:
        make_env("Pendulum-v1", seed=0, kwargs=given, max_episode_steps=5)
    assert err.value.key == "env.kwargs" and "{'g': 'abc'}" in str(err.value) and given == {"g": "abc"}


def test_an_unknown_keyword_is_named_as_one_the_constructor_does_not_accept():
    """Not as a value the env cannot run with: the constructor refused the keyword before any step."""
    with pytest.raises(ConfigError, match="keyword arguments that Pendulum-v1's constructor accepts") as err:
        make_env("Pendulum-v1", seed=0, kwargs={"g": 9.81, "gravity": 9.81})
    assert err.value.key == "env.kwargs" and "gravity" in str(err.value)


class _NarrowVectorEnv(gym.vector.VectorEnv):
    """A batched implementation that takes fewer keywords than the single env: only there is `scale` refused."""

    def __init__(self, num_envs: int, max_episode_steps: int | None = None):
        raise AssertionError("not reached: `scale` is refused first")


def test_a_keyword_only_the_vector_env_refuses_names_env_kwargs():
    gym.register(id="NarrowVector-v0", entry_point=_CountsInstances, vector_entry_point=_NarrowVectorEnv)
    with pytest.raises(ConfigError, match="keyword arguments that NarrowVector-v0's constructor accepts") as err:
        make_env("NarrowVector-v0", seed=0, kwargs={"scale": 3.5}, num_envs=2)  # the single env takes it
    assert err.value.key == "env.kwargs" and "scale" in str(err.value)


def test_make_env_seeds_the_action_space_it_returns():
    """Code that samples env.action_space directly draws the same actions in every run of the same seed."""
    for num_envs in (1, 3):
        spaces = [make_env("Pendulum-v1", seed=s, num_envs=num_envs).action_space for s in (5, 5, 6)]
        draws = [[space.sample() for _ in range(3)] for space in spaces]
        np.testing.assert_array_equal(draws[0], draws[1])
        assert not np.array_equal(draws[0], draws[2])


def test_the_package_exports_the_pipeline_by_name():
    """`from worldmodel import *` gives the pipeline's pieces (the module docstring's), each one importable."""
    import worldmodel

    namespace = {}
    exec("from worldmodel import *", namespace)
    expected = {"make_env", "env_spec", "EnvSpec", "Collector", "RandomPolicy", "RingBuffer", "ReplayBuffer", "Batch",
                "WorldModel", "GRUWorldModel", "ConfigError", "NotEnoughDataError", "WorldModelError"}  # fmt: skip
    assert set(worldmodel.__all__) == expected and expected <= set(namespace)
