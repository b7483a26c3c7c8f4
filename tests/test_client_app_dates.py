"""
The interactive app's date prompt in Brazilian Portuguese: C{DD/MM/AAAA},
C{amanhã}, and dates shown as C{DD/MM/AAAA} (issue 15, item 10).
"""

from __future__ import annotations

from datetime import date

from twisted.trial.unittest import SkipTest

from tests.common import ALICE, START
from tests.test_client_app import AppTestCase, ClientProcess
from tests.test_client_cli import local_date

DATE_PROMPT = "Data (DD/MM/AAAA, hoje, amanhã ou +N; vazio para qualquer dia): "
ITINERARY_PROMPT = "Número do itinerário (vazio para voltar): "
TINY_ROW = "1  02/12/2026 08:00  02/12/2026 09:15  SSA > REC  VP100"


class PortugueseDateTests(AppTestCase):
    def setUp(self) -> None:
        super().setUp()
        if local_date(START) != date(2026, 12, 1):
            raise SkipTest("this computer's time zone is too far from UTC for the fixture's day")

    async def to_date_prompt(self, app: ClientProcess) -> None:
        app.send("1")
        await app.expect("Origem (cidade ou código; vazio para voltar): ")
        app.send("SSA")
        await app.expect("Destino (cidade ou código): ")
        app.send("REC")
        await app.expect(DATE_PROMPT)

    async def test_brazilian_dates(self) -> None:
        app = self.start(lang="pt_BR")
        await app.expect("Boas-vindas ao VendePass!")
        for prompt, answer in [("Escolha: ", "1"), ("Usuário: ", ALICE[0]), ("Senha: ", ALICE[1])]:
            await app.expect(prompt)
            app.send(answer)
        await app.expect(f"Você entrou como {ALICE[0]}.")
        await app.expect("Escolha: ")

        await self.to_date_prompt(app)
        app.send("31/02/2026")
        refused = await app.expect(DATE_PROMPT)
        self.assertIn("A data deve ser como 02/12/2026, hoje, amanhã ou +3 (daqui a 3 dias).", refused)
        app.send("02/12/2026")
        table = await app.expect(ITINERARY_PROMPT)
        self.assertIn(TINY_ROW, table)
        app.send("")
        await app.expect("Escolha: ")

        await self.to_date_prompt(app)
        app.send("amanhã")
        self.assertIn(TINY_ROW, await app.expect(ITINERARY_PROMPT))
