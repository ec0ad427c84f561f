"""The caller's number through the real Asterisk, with CLINIC_SIP_TRUSTED_PEERS naming it.

The shipped pjsip.conf asserts each phone's own ``callerid`` to the clinic line
(``send_pai``/``trust_id_outbound`` on the workers' endpoint) and believes nothing a phone
asserts about itself (``trust_id_inbound=no``): a service that trusts this Asterisk records
the phone's configured number as verified, whatever the phone wrote. The same call to a
service that trusts nobody (the default) is in tests/e2e/test_service.py.

The rig's phones share 127.0.0.1 with Asterisk, so here trusting Asterisk's address trusts
them too; they reach the service only through Asterisk all the same (the workers register
there, and the phones dial 700).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.clinic_service import Api, running_service, service_log_on_failure, short_clinic_call
from tests.e2e.conftest import PhoneFactory
from tests.e2e.rig import AsteriskRig, service_available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not service_available(), reason="clinic_voice.app or voice.sip.pool does not import yet"
    ),
]

ASTERISK_ADDRESS = "127.0.0.1"  # the rig's bind address (its transports in pjsip.conf)
# pjsip.conf, [6001](phone): callerid="Tester 6001" <6001>.
CALLERID_6001 = "6001"
FORGED = "+31612345678"  # a patient's number, say, that the caller would like to be


@pytest.fixture(scope="module")
def service(asterisk: AsteriskRig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One worker is enough: these calls come one at a time."""
    data = tmp_path_factory.mktemp("trusting-service")
    env = {"CLINIC_SIP_TRUSTED_PEERS": ASTERISK_ADDRESS}
    with running_service(asterisk, data, workers=1, env=env) as api:
        yield api


@pytest.fixture(autouse=True)
def service_log(request: pytest.FixtureRequest, service: Api) -> Iterator[None]:
    with service_log_on_failure(request, service):
        yield


def test_a_phone_calling_through_the_trusted_asterisk_has_its_number_verified(
    service: Api, phone: PhoneFactory, asterisk: AsteriskRig
) -> None:
    """Asterisk authenticated 6001 and asserts its callerid: the record says so."""
    record = short_clinic_call(service, phone("6001"), asterisk)
    assert (record["caller"], record["caller_verified"]) == (CALLERID_6001, True), record


def test_a_phone_that_asserts_another_number_itself_still_gets_its_own(
    service: Api, phone: PhoneFactory, asterisk: AsteriskRig
) -> None:
    """6001 puts a P-Asserted-Identity of its own making on its INVITE: Asterisk drops it
    (trust_id_inbound=no) and asserts 6001's callerid, so the verified number is 6001's, not
    the forged one (with trust_id_inbound=yes it would be the forged number, verified)."""
    forged = {"P-Asserted-Identity": f'"Patient" <sip:{FORGED}@{ASTERISK_ADDRESS}>'}
    record = short_clinic_call(service, phone("6001"), asterisk, headers=forged)
    assert (record["caller"], record["caller_verified"]) == (CALLERID_6001, True), record
