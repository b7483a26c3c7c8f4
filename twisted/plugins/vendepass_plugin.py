from twisted.application.service import ServiceMaker

vendepass = ServiceMaker("VendePass", "vendepass.tap", "VendePass ticket sales server", "vendepass")
