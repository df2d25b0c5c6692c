"""How the channels read what users send: group commands, forum topics, files with words,
places, contacts and tapped buttons, parsed from Telegram's and WhatsApp's payloads."""

from __future__ import annotations

from typing import Any

from actors.key import ThreadKey
from serve_app.channel_telegram import TelegramUpdate, telegram_messages
from serve_app.channel_whatsapp import WhatsAppPayload, whatsapp_messages
from tests.unit.test_channels import update, wa_payload


def texts_of(text: str, username: str | None = "ShopBot") -> list[str]:
    parsed = telegram_messages(TelegramUpdate.model_validate(update(text)), username)
    return [m.message.text for m in parsed]


def test_a_group_command_is_this_bots_only_when_it_names_this_bot() -> None:
    assert texts_of("/supervisor@ShopBot now") == ["/supervisor now"]
    assert texts_of("/supervisor@shopbot") == ["/supervisor"]  # usernames ignore case
    assert texts_of("/remember@ShopBot\nI like tea") == ["/remember\nI like tea"]
    assert texts_of("/reset@OtherBot") == []  # another bot's: not for this one
    assert texts_of("/reset@ShopBot", username=None) == []  # who is this bot? unknown
    assert texts_of("/status") == ["/status"]
    assert texts_of("/home/ana@host is down") == ["/home/ana@host is down"]
    parsed = telegram_messages(TelegramUpdate.model_validate(update("hi")))
    assert parsed[0].message.user_id == "telegram:9"
    assert parsed[0].reply_to == {"channel": "telegram", "chat_id": 42}


def test_a_message_on_behalf_of_a_chat_has_no_user_to_remember() -> None:
    """Anonymous admins and "send as" channels come from placeholders every group shares."""
    body = update("what did I order?", chat=-100, sender=1087968824)  # GroupAnonymousBot
    body["message"]["sender_chat"] = {"id": -100, "type": "supergroup"}
    (found,) = telegram_messages(TelegramUpdate.model_validate(body))
    assert found.message.user_id is None  # memories stay the group thread's
    assert found.key == ThreadKey.of("telegram:-100")
    person = update("what did I order?", chat=-100, sender=5)
    person["message"]["chat"]["type"] = "supergroup"
    (said,) = telegram_messages(TelegramUpdate.model_validate(person))
    assert said.message.user_id == "telegram:5@-100"  # not the memories of their private chat
    private = update("what did I order?", chat=5, sender=5)
    assert telegram_messages(TelegramUpdate.model_validate(private))[0].message.user_id == (
        "telegram:5"
    )
    forward = update("a channel post", chat=-100, sender=777000)
    forward["message"] |= {"sender_chat": {"id": -200, "type": "channel"}}
    forward["message"]["is_automatic_forward"] = True
    assert telegram_messages(TelegramUpdate.model_validate(forward)) == []


def test_a_forum_topic_is_a_thread_of_its_own_answered_in_the_topic() -> None:
    body = update("book a table", chat=-100)
    body["message"] |= {"message_thread_id": 12, "is_topic_message": True}
    (found,) = telegram_messages(TelegramUpdate.model_validate(body))
    assert found.key == ThreadKey.of("telegram:-100:12")
    assert found.reply_to == {"channel": "telegram", "chat_id": -100, "message_thread_id": 12}
    assert found.message.message_id == "telegram:-100:7"


def test_a_file_sent_with_words_is_read_by_its_words() -> None:
    """The agent gets the caption, told that something came with it it cannot see."""
    body = update(None)
    body["message"]["caption"] = "this invoice is charged twice"
    (found,) = telegram_messages(TelegramUpdate.model_validate(body))
    assert found.message.text == "[photo attached, not shown] this invoice is charged twice"
    body["message"] |= {"caption": "/reset", "document": {"file_id": "d"}}
    (found,) = telegram_messages(TelegramUpdate.model_validate(body))  # never a command
    assert found.message.text == "[photo attached, not shown] /reset"
    body["message"]["caption"] = "  "
    assert telegram_messages(TelegramUpdate.model_validate(body)) == []
    # A GIF: the Bot API sends a document beside the animation.
    gif = update(None)
    gif["message"] = {k: v for k, v in gif["message"].items() if k != "photo"} | {
        "animation": {"file_id": "a"},
        "document": {"file_id": "a"},
        "caption": "is this the right one?",
    }
    (found,) = telegram_messages(TelegramUpdate.model_validate(gif))
    assert found.message.text == "[animation attached, not shown] is this the right one?"
    gif["message"]["caption"] = "/scan@OtherBot"  # for another bot in the group
    assert telegram_messages(TelegramUpdate.model_validate(gif), "ShopBot") == []

    def media(kind: str, wamid: str, caption: str | None) -> dict:
        attached = {"id": "1"} | ({"caption": caption} if caption is not None else {})
        return {"from": "34600111222", "id": wamid, "type": kind, kind: attached}

    payload = wa_payload(
        media("image", "wamid.1", "my passport"),
        media("document", "wamid.2", "the contract"),
        media("image", "wamid.3", None),  # nothing to read
        {"from": "34600111222", "id": "wamid.4", "type": "sticker", "sticker": {"id": "s"}},
    )
    parsed = whatsapp_messages(WhatsAppPayload.model_validate(payload))
    assert [m.message.text for m in parsed] == [
        "[image attached, not shown] my passport",
        "[document attached, not shown] the contract",
    ]


def test_a_shared_place_is_read_by_its_name_and_coordinates() -> None:
    venue = update(None)
    venue["message"] = {k: v for k, v in venue["message"].items() if k != "photo"} | {
        "location": {"latitude": 40.4168, "longitude": -3.7038},
        "venue": {
            "location": {"latitude": 40.4168, "longitude": -3.7038},
            "title": "Puerta del Sol",
            "address": "Plaza de la Puerta del Sol, Madrid",
        },
    }
    (found,) = telegram_messages(TelegramUpdate.model_validate(venue))
    assert found.message.text == (
        "[location shared] Puerta del Sol, Plaza de la Puerta del Sol, Madrid (40.4168, -3.7038)"
    )
    del venue["message"]["venue"]
    venue["message"]["location"] = {"latitude": 40.41683319, "longitude": -3.70379019}
    (found,) = telegram_messages(TelegramUpdate.model_validate(venue))
    assert found.message.text == "[location shared] 40.416833, -3.70379"

    def place(wamid: str, **location: Any) -> dict:
        return {"from": "34600111222", "id": wamid, "type": "location", "location": location}

    payload = wa_payload(
        place("wamid.1", latitude=41.3874, longitude=2.1686, name="Hotel Arts", address=" "),
        place("wamid.2", latitude=41.3874, longitude=2.1686),
        place("wamid.3", latitude=51.4779, longitude=-0.00001, name="Royal Observatory"),
        place("wamid.4", latitude=-0.0000001, longitude=0.00009),
    )
    parsed = whatsapp_messages(WhatsAppPayload.model_validate(payload))
    assert [m.message.text for m in parsed] == [
        "[location shared] Hotel Arts (41.3874, 2.1686)",
        "[location shared] 41.3874, 2.1686",
        "[location shared] Royal Observatory (51.4779, -0.00001)",  # never 1e-05
        "[location shared] 0, 0.00009",  # never -0
    ]


def test_a_shared_contact_is_read_by_its_name_phones_and_emails() -> None:
    card = update(None)
    card["message"] = {k: v for k, v in card["message"].items() if k != "photo"} | {
        "contact": {"phone_number": "+34600111222", "first_name": "Marta", "last_name": "Ruiz"}
    }
    (found,) = telegram_messages(TelegramUpdate.model_validate(card))
    assert found.message.text == "[contact shared] Marta Ruiz, +34600111222"
    card["message"]["contact"] = {"phone_number": "34600", "first_name": " "}
    (found,) = telegram_messages(TelegramUpdate.model_validate(card))
    assert found.message.text == "[contact shared] 34600"

    def shared(wamid: str, *contacts: dict) -> dict:
        return {"from": "34600111222", "id": wamid, "type": "contacts", "contacts": contacts}

    marta = {
        "name": {"formatted_name": "Marta Ruiz", "first_name": "Marta"},
        "phones": [{"phone": "+34 600 111 222", "type": "CELL", "wa_id": "34600111222"}],
        "emails": [{"email": "marta@example.com", "type": "WORK"}],
    }
    payload = wa_payload(
        shared("wamid.1", marta, {"name": {"formatted_name": "Luis"}, "phones": [{"phone": "1"}]}),
        shared("wamid.2", {"name": {"formatted_name": " "}}),  # nothing to read: not answered
    )
    parsed = whatsapp_messages(WhatsAppPayload.model_validate(payload))
    assert [m.message.text for m in parsed] == [
        "[contact shared] Marta Ruiz, +34 600 111 222, marta@example.com; Luis, 1"
    ]


def test_a_tapped_button_or_list_row_is_read_as_its_title() -> None:
    """Replies to the business's templates and interactive messages reach the agent."""

    def tapped(wamid: str, kind: str, body: dict) -> dict:
        return {"from": "34600111222", "id": wamid, "type": kind, kind: body}

    payload = wa_payload(
        tapped("wamid.1", "button", {"payload": "confirm-42", "text": "Confirm booking"}),
        tapped(
            "wamid.2",
            "interactive",
            {"type": "button_reply", "button_reply": {"id": "b1", "title": "Change date"}},
        ),
        tapped(
            "wamid.3",
            "interactive",
            {
                "type": "list_reply",
                "list_reply": {"id": "r1", "title": "Express", "description": "1-2 days"},
            },
        ),
        # A flow's answer has no words to read: not answered.
        tapped("wamid.4", "interactive", {"type": "nfm_reply", "nfm_reply": {"name": "flow"}}),
        tapped("wamid.5", "button", {"payload": "p"}),
    )
    parsed = whatsapp_messages(WhatsAppPayload.model_validate(payload))
    assert [m.message.text for m in parsed] == [
        "Confirm booking",
        "Change date",
        "Express (1-2 days)",
    ]
    assert parsed[0].reply_to == {
        "channel": "whatsapp",
        "phone_number_id": "1055",
        "to": "34600111222",
    }
