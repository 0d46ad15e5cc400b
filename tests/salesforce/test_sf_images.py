"""Pure rules for API records: formats, SOQL, order keys against CDC, the echo rule."""

from __future__ import annotations

import pytest
from sferp.operators.merge import SfRecord
from sferp.operators.sf_images import (
    coerce_csv,
    delta_soql,
    ids_soql,
    parse_datetime_ms,
    poll_change,
    resync_change,
    soql_datetime,
    writeback_echo,
)

from sferp.events import CREATE, IMAGE, UPDATE, Change

MS = 1_795_000_000_123  # 2026-11-18T11:06:40.123Z
FIELDS = frozenset({"ERP_Stage__c", "ERP_Order_No__c"})


def test_datetime_formats():
    for text in (
        "2026-11-18T11:06:40.123+0000",  # REST
        "2026-11-18T11:06:40.123Z",  # Bulk CSV, CDC
        "2026-11-18T12:06:40.123+01:00",
        "2026-11-18T11:06:40.1234567Z",
    ):
        assert parse_datetime_ms(text) == MS, text
    assert parse_datetime_ms("2026-11-18T11:06:40Z") == MS - 123
    assert soql_datetime(MS) == "2026-11-18T11:06:40Z"  # SOQL compares whole seconds
    # The event-time range's ends: a gap's look-back from year 1 reached year 0 (a
    # ValueError that stopped the flow); no Salesforce record is older than 1970.
    assert soql_datetime(-62_135_596_800_000 - 3_600_000) == "1970-01-01T00:00:00Z"
    assert soql_datetime(253_402_300_799_999) == "9999-12-31T23:59:59Z"
    with pytest.raises(ValueError):
        parse_datetime_ms("yesterday")


def test_soql_shapes():
    assert delta_soql("Account", MS) == (
        "SELECT Id, SystemModstamp, IsDeleted, Name, ERP_Customer_Number__c FROM Account "
        "WHERE SystemModstamp >= 2026-11-18T11:06:40Z ORDER BY SystemModstamp, Id"
    )
    assert "WHERE" not in delta_soql("Account", None)
    assert ids_soql("Product2", ["01t000000000001", "01t000000000002AAA"]).endswith(
        "WHERE Id IN ('01t000000000001', '01t000000000002AAA')"
    )
    with pytest.raises(ValueError):
        ids_soql("Product2", ["x') OR Name != ('"])


def _rec(**fields):
    return {"Id": "801000000000001", "SystemModstamp": "2026-11-18T11:06:40.123+0000", **fields}


def _cdc(op: str, order: tuple, **fields) -> Change:
    return Change("salesforce", "Order", "801000000000001AAA", op, order, order[0],
                  f"sf|Order|tx|{order[2]}|801000000000001AAA", fields, "sf.cdc", 0, 0)  # fmt: skip


def test_a_polled_image_loses_ties_to_cdc_and_wins_against_older_events():
    image = poll_change("Order", _rec(Status="Activated", TotalAmount=10.0))
    assert image.key == "801000000000001AAA" and image.op == IMAGE
    assert image.order == (MS, 0, 0)
    assert image.fields["AccountId"] is None  # a full image: absent §1 fields are null
    rec = SfRecord()
    rec.apply(_cdc(CREATE, (MS - 5_000, 7, 1), Status="Draft", TotalAmount=9.0))
    rec.apply(image)
    assert rec.fields["Status"] == "Activated" and rec.activated_at == MS
    # The CDC event of the transaction the image shows commits at or after S.
    rec.apply(_cdc(UPDATE, (MS, 9, 1), Status="Activated"))
    assert rec.stamps["Status"][0] == (MS, 9, 1)
    rec.apply(_cdc(UPDATE, (MS - 1, 8, 1), TotalAmount=9.5))  # older: the image wins
    assert rec.fields["TotalAmount"] == 10.0
    assert not rec.lc_deleted
    gone = poll_change("Order", _rec(IsDeleted=True, Status="Draft"))
    assert gone.op == "delete" and gone.fields["Status"] == "Draft"


def test_a_reread_sits_right_after_its_gap():
    gap = Change("salesforce", "Order", "801000000000001AAA", "gap", (MS, 5, 2), MS,
                 "sf|Order|tx|2|801000000000001AAA", None, "sf.cdc", 3, 99)  # fmt: skip
    img = resync_change("Order", gap.key, _rec(Status="Draft"), gap)
    assert img.order == (MS, 5, 2, 1) and (MS, 5, 2) < img.order < (MS, 5, 3)
    assert (img.topic, img.partition, img.offset, img.primary) == ("sf.cdc", 3, 99, False)
    missing = resync_change("Order", gap.key, None, gap)
    assert missing.op == "delete" and missing.fields is None and missing.event_time == MS


def test_bulk_csv_rows_are_typed_like_rest():
    row = {"Id": "a", "Quantity": "2", "UnitPrice": "", "OrderId": "801", "IsDeleted": "false"}
    assert coerce_csv("OrderItem", row) == {
        "Id": "a",
        "Quantity": 2.0,
        "UnitPrice": None,
        "OrderId": "801",
        "IsDeleted": False,
    }
    assert coerce_csv("Product2", {"IsActive": "true"})["IsActive"] is True


def _echo(change_type="UPDATE", origin="com/salesforce/api/rest/62.0;client=sferp", **h):
    header = {"changeType": change_type, "changeOrigin": origin, "commitTimestamp": MS}
    header.setdefault("changedFields", ["ERP_Stage__c", "LastModifiedDate"])
    header.update(h)
    return {"payload": {"ChangeEventHeader": header, "ERP_Stage__c": "OPEN"}}


def test_the_echo_rule():
    assert writeback_echo(_echo(), "sferp", FIELDS) == MS
    flat = _echo()["payload"]  # the bare and flat forms carry the header at the top
    assert writeback_echo(flat, "sferp", FIELDS) == MS
    assert writeback_echo(_echo(origin="com/salesforce/api/rest/62.0"), "sferp", FIELDS) is None
    assert writeback_echo(_echo(origin="x;client=sferp2"), "sferp", FIELDS) is None
    assert writeback_echo(_echo(changedFields=["ERP_Stage__c", "Status"]), "sferp", FIELDS) is None
    assert writeback_echo(_echo(changedFields=[]), "sferp", FIELDS) is None
    assert writeback_echo(_echo(nulledFields=["Status"]), "sferp", FIELDS) is None
    assert writeback_echo(_echo(nulledFields=["ERP_Order_No__c"]), "sferp", FIELDS) == MS
    assert writeback_echo(_echo("CREATE"), "sferp", FIELDS) is None
