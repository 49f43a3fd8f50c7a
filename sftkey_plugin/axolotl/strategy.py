"""``type: sftkey_plugin.axolotl.strategy``: Axolotl's ``chat_template`` strategy plus the ``sftkey_mask`` column.

The row is tokenised by Axolotl exactly as ``type: chat_template`` does (labels, roles, EOS/EOT rules untouched);
the key mask is then made by the core's ``tokenize_with_key_mask`` (the TRL side's own function) on the same
conversation and template, checked to give the same ``input_ids``, and restricted to the tokens Axolotl trains
(``labels != -100``). So for one example and template the mask equals the TRL mask on trained tokens.

Every trained assistant turn gets its key span (``sftkey_turns: last``: only the last), and a message whose
reasoning Axolotl holds under the template's thinking key (``reasoning_content``; ``split_thinking`` and
``field_thinking`` applied) has its ``content`` as the answer.

Extra columns: ``sftkey_mask`` (int 0/1, as long as ``input_ids``), ``sftkey_finder`` (the finder that matched,
``""`` none, ``"not_located"`` when neither the render nor Axolotl's own tokens could place it), ``sftkey_turns`` and
``sftkey_turns_found``; the trainer counts and removes all but the mask. When Axolotl's tokens differ from
``apply_chat_template``'s, the mask is made from Axolotl's tokens (``key_mask_from_token_ids``: each trained turn
decoded and re-tokenised with offsets).
Rows without key tokens are kept here, so that ``sftkey_min_found`` counts them; ``sftkey_on_missing: drop`` drops them
after counting (``SFTKeyPlugin.load_datasets``), before Axolotl counts the training steps.

Data weights (``sftkey_message_weight_field`` on assistant messages, ``sftkey_example_weight_field`` on the record,
``sftkey_prompt_weight``): Axolotl drops message fields it does not know, so each message's weight is read from the
record and placed by the same core step as on the TRL side; the row then carries ``sftkey_weight`` and
``sftkey_prompt`` composed on Axolotl's labels (``compose_data_weights``: the tokens ``train_on_inputs: false`` /
``roles_to_train`` leave out get the prompt weight and their labels back; a turn the data leaves out with
``training`` / ``training_detail`` stays untrained) and the counts ``sftkey_message_weights``
and ``sftkey_example_weighted``. The strategy sees one record at a time (and none on a prepared-data cache hit), so it
makes these columns on every row; the trainer decides from the prepared rows whether data weights are on, and
removes the columns when they are not.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from axolotl.prompt_strategies.chat_template import ChatTemplateStrategy, StrategyLoader
from axolotl.prompters import IGNORE_TOKEN_ID

from ..collator import SFTKEY_MASK
from ..config import sftkey_arguments_from, validate_sftkey_arguments
from ..tokenize import (
    NOT_LOCATED,
    REASONING_FIELDS,
    TURN_COLUMNS,
    MarkingOptions,
    TurnsMarked,
    answer_turns,
    key_mask_from_token_ids,
    message_weights_by_runs,
    require_fast_tokenizer,
    tokenize_with_key_mask,
    warn_if_reasoning_dropped,
)
from ..weights import (
    SFTKEY_EXAMPLE_WEIGHT,
    SFTKEY_WEIGHT,
    DataWeightOptions,
    RecordWeights,
    compose_data_weights,
    record_weights,
)

logger = logging.getLogger("sftkey_plugin")

SFTKEY_FINDER = "sftkey_finder"
# per-row counts of the record's data weights, read and removed by the trainer
MESSAGE_WEIGHTS = "sftkey_message_weights"
EXAMPLE_WEIGHTED = "sftkey_example_weighted"
# the turn fields by which the data, rather than the role, decides what Axolotl trains
DATA_TRAINING = ("training", "training_detail", "reasoning_training_detail")


class SFTKeyChatTemplateStrategy(ChatTemplateStrategy):
    """``ChatTemplateStrategy`` that adds ``sftkey_mask`` / ``sftkey_finder`` (and the data weights) to each row."""

    def __init__(
        self,
        *args: Any,
        marking: MarkingOptions | None = None,
        on_missing: str = "keep",
        weights: DataWeightOptions | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.marking = marking
        self.on_missing = on_missing
        self.weights = weights
        self._reasoning_checked = False
        self._roles_only = False  # get_conversation_thread without DATA_TRAINING: Axolotl's role rule alone
        if marking is not None:
            require_fast_tokenizer(self.tokenizer)

    def _tokenize_single_prompt(self, prompt: dict) -> dict[str, list[int]]:  # type: ignore[override]
        result = super()._tokenize_single_prompt(prompt)
        if self.marking is None:
            return result
        marked = self.key_mask(prompt, result["input_ids"], result["labels"])
        if self.on_missing == "error" and 1 not in marked[SFTKEY_MASK]:
            content = self._last_assistant(prompt)
            raise ValueError(
                f"SFTKey: no key answer found (finder {self.marking.finder!r}"
                + (
                    ", the rendered conversation did not match Axolotl's tokens"
                    if marked[SFTKEY_FINDER] == NOT_LOCATED
                    else ""
                )
                + f") in the example whose last assistant message is {content[-200:]!r}. Fix the data, choose "
                "another sftkey_finder, or set sftkey_on_missing to 'drop' or 'keep'."
            )
        if self.weights is not None:  # after marking: the prompt tokens' labels come back here
            example_weight = marked.pop(SFTKEY_EXAMPLE_WEIGHT)
            marked.update(
                compose_data_weights(
                    result["input_ids"],
                    result["labels"],
                    marked[SFTKEY_WEIGHT],
                    example_weight,
                    self.weights.prompt_weight,
                    self._prompt_tokens(prompt, result["input_ids"]) if self.weights.prompt_weight > 0 else None,
                )
            )
        result.update(marked)
        return result

    def get_conversation_thread(self, prompt: dict) -> list[dict]:  # type: ignore[override]
        turns = super().get_conversation_thread(prompt)
        if self._roles_only:
            return [{key: value for key, value in turn.items() if key not in DATA_TRAINING} for turn in turns]
        return turns

    def _prompt_tokens(self, prompt: dict, input_ids: list[int]) -> list[int] | None:
        """1 on the tokens the prompt weight may train: those Axolotl leaves out by its role rule alone, so that a
        turn the data leaves out (``training: false``, ``training_detail``) stays untrained. None when no turn
        carries such a field: every token Axolotl leaves out."""
        if not any(key in turn for turn in self.get_conversation_thread(prompt) for key in DATA_TRAINING):
            return None
        self._roles_only = True
        try:
            as_roles = super()._tokenize_single_prompt(prompt)
        finally:
            self._roles_only = False
        if list(as_roles["input_ids"]) != list(input_ids):
            raise ValueError(
                "SFTKey: the chat template renders the turns' training fields, so the prompt tokens of the example "
                f"whose last assistant message is {self._last_assistant(prompt)[-200:]!r} cannot be told apart from "
                "the turns the data leaves out. Set sftkey_prompt_weight: 0 or remove the training fields."
            )
        return [int(label == IGNORE_TOKEN_ID) for label in as_roles["labels"]]

    def _last_assistant(self, prompt: dict) -> str:
        for turn in reversed(self.get_conversation_thread(prompt)):
            if turn.get("role") == "assistant" and isinstance(turn.get("content"), str):
                return turn["content"]
        return ""

    def _with_unread_fields(self, prompt: dict, turns: list[dict]) -> list[dict]:
        """Axolotl's turns (split_thinking and field_thinking applied), with the fields back that it drops when its
        template does not read them: a message's separate reasoning still makes its content the answer, as on the
        TRL side, whether the template renders the reasoning or not; and its data weight."""
        messages = self._get_messages(prompt)
        # +1: Axolotl put a system turn from field_system first; -1: drop_system_message dropped the first message
        offset = len(turns) - len(messages)
        weight_field = self.weights.message_field if self.weights is not None else None
        if offset not in (-1, 0, 1):
            if weight_field is not None and any(message.get(weight_field) is not None for message in messages):
                raise ValueError(
                    f"SFTKey: Axolotl made {len(turns)} turns of the {len(messages)} messages of the example whose "
                    f"last assistant message is {self._last_assistant(prompt)[-200:]!r}, so the messages' weights "
                    f"('{weight_field}') cannot be paired with the turns. Remove the weights from its messages."
                )
            return turns
        restored = list(turns)
        for index in range(max(0, -offset), len(messages)):
            message, turn = messages[index], restored[index + offset]
            field = self.marking.reasoning_of(message) if self.marking is not None else None
            if field is not None and not self.marking.has_reasoning(turn):  # type: ignore[union-attr]
                turn = {**turn, field: message[field]}
            if weight_field is not None and message.get(weight_field) is not None and weight_field not in turn:
                turn = {**turn, weight_field: message[weight_field]}
            restored[index + offset] = turn
        return restored

    def _example(self, prompt: dict) -> dict[str, Any]:
        """The record as the core reads it: Axolotl's turns (with the fields it dropped) as ``messages``."""
        return {
            **prompt,
            "messages": self._with_unread_fields(prompt, self.get_conversation_thread(prompt)),
            "tools": self._get_tools(prompt),
            "chat_template_kwargs": self.prompter.chat_template_kwargs,
        }

    def _trained(self, turn: dict) -> bool:
        """Whether Axolotl trains a turn (its rule in ``_tokenize_single_prompt``)."""
        if turn.get("training") is not None:
            return bool(turn["training"])
        if turn.get("training_detail") is not None or turn.get("reasoning_training_detail") is not None:
            return bool(turn.get("training_detail")) or bool(turn.get("reasoning_training_detail"))
        return bool(self.train_on_inputs) or turn.get("role") in self.roles_to_train

    def key_mask(self, prompt: dict, input_ids: list[int], labels: list[int]) -> dict[str, Any]:
        """The ``TurnsMarked`` columns on Axolotl's tokens, key mask 0 where ``labels`` is ignored; with data weights
        also ``sftkey_weight``, each token's message x example weight (whatever its label)."""
        assert self.marking is not None
        example = self._example(prompt)
        turns = example["messages"]
        # Axolotl puts each message's reasoning under the template's thinking key (field_thinking maps the data's)
        marking = self.marking
        if marking.reasoning_field is None and self.prompter.template_thinking_key not in REASONING_FIELDS:
            marking = dataclasses.replace(marking, reasoning_field=self.prompter.template_thinking_key)
        if not self._reasoning_checked:  # once per strategy (per data process), on its first record, as TRL does
            self._reasoning_checked = True
            warn_if_reasoning_dropped(example, self.tokenizer, marking, self.prompter.chat_template)
        # checked before marking, whose errors only mean "nothing to mark": a bad weight stops the run
        record = record_weights(example, self.weights) if self.weights is not None else None
        try:
            marked = tokenize_with_key_mask(
                example, self.tokenizer, marking, chat_template=self.prompter.chat_template, weights=self.weights
            )
        except ValueError as error:  # e.g. no assistant message: nothing to mark, nor any message weight
            if record is not None and record.messages:  # weighed messages that cannot be placed: not a silent 1
                raise
            logger.debug("SFTKey could not mark an example: %s", error)
            columns = TurnsMarked(mask=[0] * len(input_ids)).columns()
            return columns if record is None else {**columns, **_weight_columns(record, None, len(input_ids))}
        if list(marked["input_ids"]) != list(input_ids):
            # Axolotl's render differs from apply_chat_template's (its own turn handling): mark its tokens directly,
            # each trained turn paired with its message so that an answer whose reasoning is apart stays all key
            answers = [
                turns[i]["content"] if marking.has_reasoning(turns[i]) else None
                for i in answer_turns(turns, 0, "all")
                if self._trained(turns[i])
            ]
            columns = key_mask_from_token_ids(input_ids, labels, self.tokenizer, marking, prompt, answers).columns()
            if record is not None:  # each run of trained tokens is one trained turn
                trained = [i for i, turn in enumerate(turns) if self._trained(turn)]
                turn_weights = [record.messages.get(i, 1.0) * record.example_weight for i in trained]
                by_runs = message_weights_by_runs(labels, turn_weights) if record.messages else None
                columns.update(_weight_columns(record, by_runs, len(input_ids)))
            return columns
        columns = {name: marked[name] for name in TURN_COLUMNS}
        columns[SFTKEY_MASK] = [int(m and label != IGNORE_TOKEN_ID) for m, label in zip(marked[SFTKEY_MASK], labels)]
        if 1 not in columns[SFTKEY_MASK]:  # the key lay only in tokens Axolotl does not train
            columns.update({SFTKEY_FINDER: "", "sftkey_turns_found": 0})
        if record is not None:
            columns.update(_weight_columns(record, marked[SFTKEY_WEIGHT], len(input_ids)))
        return columns


def _weight_columns(record: RecordWeights, token_weights: list[float] | None, length: int) -> dict[str, Any]:
    """A row's data-weight columns before composition: each token's message x example weight (None: the example
    weight on every token), the example weight, and the counts of the record's weights."""
    return {
        SFTKEY_WEIGHT: token_weights if token_weights is not None else [record.example_weight] * length,
        SFTKEY_EXAMPLE_WEIGHT: record.example_weight,
        MESSAGE_WEIGHTS: len(record.messages),
        EXAMPLE_WEIGHTED: int(record.example is not None),
    }


class SFTKeyStrategyLoader(StrategyLoader):
    """Builds ``SFTKeyChatTemplateStrategy`` from the validated Axolotl config (``sftkey_*`` keys)."""

    def _get_strategy_cls(self, cfg):  # type: ignore[no-untyped-def]
        if cfg.tokenizer_use_mistral_common:
            raise ValueError("SFTKey needs a Hugging Face fast tokenizer: set tokenizer_use_mistral_common: false.")
        return SFTKeyChatTemplateStrategy

    def _get_strategy_params(self, cfg, ds_cfg: dict[str, Any]):  # type: ignore[no-untyped-def]
        params = super()._get_strategy_params(cfg, ds_cfg)
        if cfg.get("sftkey"):
            arguments = sftkey_arguments_from(cfg)
            validate_sftkey_arguments(arguments)
            params["marking"] = MarkingOptions.from_arguments(arguments)
            params["on_missing"] = arguments.sftkey_on_missing
            params["weights"] = DataWeightOptions.from_arguments(arguments)
        else:
            from .args import PLUGIN_NAME
            from .plugin import plugin_discovered

            # listed, or loaded from its entry point (Axolotl 0.21)
            loaded = PLUGIN_NAME in (cfg.get("plugins") or []) or plugin_discovered()
            logger.warning(
                "SFTKey: a dataset uses type sftkey_plugin.axolotl.strategy but %s: it is tokenised as plain "
                "chat_template, without key marking.",
                "sftkey is not true" if loaded else f"the plugin is not listed under plugins: (add {PLUGIN_NAME})",
            )
        return params


load = SFTKeyStrategyLoader()
