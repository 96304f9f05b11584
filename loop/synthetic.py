"""Deterministic synthetic Korean dialogue→summary data in DialogSum CSV form, for the offline demo and tests.

Each example picks a topic, draws slot values (names, dates, times, prices, ...) from fixed lists, renders a
dialogue from several phrasings per turn (plus optional small talk, closings and a third speaker) and renders
the summary from a per-outcome template. Summary slot values always appear verbatim in the dialogue, so the
summary is learnable, and every summary carries at least two of them, so a topic template alone scores low.

`topic_template_summary` recovers the template of any summary (also one read back from CSV) by matching it
against the summary templates, whose slots only accept values from the slot lists, and re-renders it with one
fixed placeholder per slot kind.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from loop.errors import UserError, run_cli

# Bump whenever the output for a given seed changes, so ensure_demo_data regenerates stale files.
GENERATOR_VERSION = 1

SPEAKER_TOKENS: tuple[str, ...] = ("#Person1#", "#Person2#", "#Person3#")
MASK_TOKENS: tuple[str, ...] = (
    "#PhoneNumber#",
    "#Address#",
    "#PersonName#",
    "#Email#",
    "#DateOfBirth#",
    "#CarNumber#",
    "#CardNumber#",
)
COLUMNS: tuple[str, ...] = ("fname", "dialogue", "summary")


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _won(amounts: str) -> tuple[str, ...]:
    return tuple(f"{int(a):,}원" for a in amounts.split())


_SURNAMES = _words("김 이 박 최 정 강 조 윤 장 임 한 오 서 신 권 황")
_GIVEN = _words("민수 서연 지훈 유진 하늘 도윤 수아 지호 예린 현우 소희 준영 지민 동현 나연 태민 수빈 재원")
_COLORS = _words("검은색 흰색 빨간색 회색 파란색 베이지색")
_GOODS = _words("운동화 이어폰 코트 주전자 가방 마우스 청바지 가습기 의자 텀블러 블렌더 원피스 면도기 모자")

# Slot kinds. Lists are ordered; the first value is the kind's placeholder in template-only summaries.
_KINDS: dict[str, tuple[str, ...]] = {
    "name": tuple(s + g for g in _GIVEN for s in _SURNAMES),
    "date": tuple(f"{m}월 {d}일" for m in range(1, 13) for d in range(1, 29)),
    "time": tuple(
        [f"오전 {h}시" for h in (9, 10, 11)]
        + [f"오전 {h}시 30분" for h in (9, 10, 11)]
        + ["낮 12시", "낮 12시 30분"]
        + [f"오후 {h}시" for h in range(1, 7)]
        + [f"오후 {h}시 30분" for h in range(1, 7)]
        + [f"저녁 {h}시" for h in (7, 8, 9)]
        + [f"저녁 {h}시 30분" for h in (7, 8)]
    ),
    "people": tuple(f"{k}명" for k in range(2, 13)),
    "price": _won(
        "12500 15900 18000 23500 27800 32000 35500 39900 42000 48500 54900 59000 "
        "65500 72900 79000 86500 99000 124000 149500 189000 235000 299000"
    ),
    "trip_price": tuple(f"{k}만 원" for k in (35, 42, 49, 55, 59, 68, 75, 89, 99, 120, 150, 189)),
    "deposit": tuple(f"{k}만 원" for k in (300, 500, 800, 1000, 1500, 2000, 3000, 5000)),
    "rent": tuple(f"{k}만 원" for k in (40, 45, 50, 55, 60, 65, 70, 75, 80, 90, 100)),
    "days": _words("이틀 사흘 나흘 닷새 일주일 열흘"),
    "months": _words("1개월 3개월 6개월 12개월"),
    "years": _words("1년 2년 3년 4년 5년 7년 10년"),
    "nights": ("1박 2일", "2박 3일", "3박 4일", "4박 5일"),
    "weekdays": (
        "월요일과 수요일", "화요일과 목요일", "수요일과 금요일", "토요일과 일요일", "월요일과 금요일",
    ),
    "restaurant": tuple(
        f"{a} {b}"
        for a, b in zip(_words("한강 소담 바다 하루 토담 맛나 산들 고향 미소 달빛 초원 은행나무"),
                        _words("식당 한정식 횟집 스시 갈비 분식 칼국수 순대국 파스타 중식당 삼겹살 카페"),
                        strict=True)
    ),
    "dept": _words("내과 치과 안과 피부과 정형외과 이비인후과 소아과 신경과"),
    "item": tuple(f"{c} {g}" for g in _GOODS for c in _COLORS),
    "reason": ("사이즈 문제", "색상 차이", "제품 불량", "배송 중 파손", "단순 변심"),
    "city": _words("제주도 부산 강릉 여수 경주 전주 속초 오사카 도쿄 방콕 다낭 타이베이"),
    "company": _words("한빛전자 미래물산 푸른소프트 대성건설 새솔식품 누리통신 다온제약 바른물류 하늘항공"),
    "position": ("마케팅 담당자", "웹 개발자", "회계 담당자", "영업 사원", "디자이너", "데이터 분석가"),
    "district": _words("마포구 성동구 송파구 관악구 서초구 은평구 노원구 동작구 강서구 광진구"),
    "home": _words("원룸 투룸 오피스텔 아파트 빌라"),
    "meeting": (
        "신제품 출시", "예산 검토", "분기 실적", "홍보 전략", "고객 만족도", "채용 계획", "사무실 이전",
    ),
    "room": ("3층 회의실", "대회의실", "소회의실", "세미나실", "501호", "302호", "7층 라운지"),
    "bank": _words("한빛은행 누리은행 새솔은행 바른은행 미래은행 하늘은행"),
    "store": ("편의점", "주유소", "백화점", "온라인 쇼핑몰", "카페", "대형 마트", "약국"),
    "lost": ("검은색 지갑", "갈색 가방", "파란 우산", "휴대폰", "노트북", "자동차 열쇠", "안경", "카드 지갑"),
    "lost_place": ("지하철 2호선", "버스 정류장", "역 앞 카페", "도서관", "택시 안", "공원 벤치", "영화관"),
    "subject": (
        "경제학 원론", "통계학", "한국사", "미적분", "영어 회화", "일반 화학", "심리학 개론", "세계 문학",
    ),
    "task": ("기말 보고서", "조별 발표 자료", "실험 보고서", "독후감", "중간 과제"),
    "garage": ("바른 정비소", "한빛 카센터", "믿음 자동차", "우리 모터스", "새길 공업사"),
    "part": ("브레이크", "에어컨", "타이어", "배터리", "와이퍼", "헤드라이트", "엔진 오일"),
    "sport": _words("요가 필라테스 수영 스피닝 복싱 클라이밍"),
    "show": ("영화", "전시회", "뮤지컬", "야구 경기", "연극", "콘서트"),
    "place": (
        "강남역", "서울역", "시청 앞", "홍대입구역", "명동", "광화문", "잠실역", "여의도", "신촌", "판교역",
    ),
    "isp": _words("누리통신 한빛넷 바른인터넷 하늘텔레콤"),
}

# Particles that depend on whether the host word ends in a consonant: key -> (after consonant, after vowel).
_JOSA: dict[str, tuple[str, str]] = {
    "은": ("은", "는"),
    "이": ("이", "가"),
    "을": ("을", "를"),
    "과": ("과", "와"),
    "으로": ("으로", "로"),
    "이에요": ("이에요", "예요"),
    "이라고": ("이라고", "라고"),
    "이라는": ("이라는", "라는"),
    "이라": ("이라", "라"),
    "이다": ("이다", "다"),
    "이죠": ("이죠", "죠"),
}
# Speaker tokens are read 퍼슨원/퍼슨투/퍼슨쓰리, which decides their particles.
_SPEAKER_LAST_SYLLABLE = {"#Person1#": "원", "#Person2#": "투", "#Person3#": "리"}

_Beat = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class _Outcome:
    summary: str
    beats: tuple[_Beat, ...]


@dataclass(frozen=True)
class _Topic:
    name: str
    slots: tuple[tuple[str, str], ...]  # (slot, kind)
    intro: _Beat | None  # optional first turn; its speaker then becomes #Person1#
    beats: tuple[_Beat, ...]
    outcomes: tuple[_Outcome, ...]
    casual: bool = False  # friends talking: banmal small talk and no service-desk closing


def _b(role: str, *phrasings: str) -> _Beat:
    return role, phrasings


def _o(summary: str, *beats: _Beat) -> _Outcome:
    return _Outcome(summary, beats)


def _slots(spec: str) -> tuple[tuple[str, str], ...]:
    """Parse "slot:kind slot2:kind ..." (a bare "kind" names a slot after its kind)."""
    return tuple((s.split(":")[0], s.split(":")[-1]) for s in spec.split())


# Roles: "c" is the caller/customer/initiator, "a" the other party; both render as speaker tokens.
# Every summary slot is present in every phrasing of at least one always-spoken beat (a test checks this).
_TOPICS: tuple[_Topic, ...] = (
    _Topic(
        "restaurant",
        _slots("name restaurant date time time2:time count:people"),
        _b("a", "네, {restaurant}입니다.", "안녕하세요, {restaurant}입니다. 말씀하세요."),
        (
            _b(
                "c",
                "{restaurant:이죠}? {date} {time}에 {count} 자리를 예약하고 싶은데요.",
                "{restaurant}에 {date} {time:으로} {count} 예약하려고 전화했어요.",
                "{restaurant}에 {date} {time}, {count} 예약 가능할까요?",
            ),
        ),
        (
            _o(
                "{c:은} {restaurant}에 {date} {time} {count} 자리를 {name} 씨 이름으로 예약했다.",
                _b("a", "네, 가능합니다. 성함이 어떻게 되세요?", "자리가 있습니다. 성함을 알려 주세요."),
                _b(
                    "c",
                    "{name}입니다. 번호는 #PhoneNumber#예요.",
                    "{name:이에요}. 연락처는 #PhoneNumber#입니다.",
                ),
                _b("a", "{name} 씨, 예약되었습니다.", "네, {name} 씨 이름으로 예약해 드렸습니다."),
            ),
            _o(
                "{c:은} {restaurant}에 {date} {time:을} 원했지만 자리가 없어 {time2:으로} {count} 예약했다.",
                _b(
                    "a",
                    "{time}에는 자리가 없습니다. {time2}에는 가능한데요.",
                    "{time:은} 다 찼어요. {time2:은} 어떠세요?",
                ),
                _b("c", "네, {time2:으로} 할게요.", "그럼 {time2:으로} 해 주세요."),
                _b("a", "네, {time2:으로} 예약되었습니다.", "알겠습니다. {count} 예약해 드렸습니다."),
            ),
        ),
    ),
    _Topic(
        "hospital",
        _slots("name dept date time time2:time"),
        _b("a", "네, 튼튼병원 접수처입니다.", "안녕하세요, 병원 예약 센터입니다."),
        (
            _b("c", "{dept} 진료를 예약하고 싶어요.", "{dept} 예약 좀 하려고요. 며칠째 아파서요."),
            _b("a", "성함과 생년월일을 말씀해 주세요.", "환자분 성함과 생년월일을 알려 주시겠어요?"),
            _b("c", "{name}이고, 생년월일은 #DateOfBirth#입니다.", "{name:이에요}. #DateOfBirth#생입니다."),
            _b("a", "언제 오시겠어요?", "원하시는 날짜가 있으세요?"),
            _b("c", "{date} {time}쯤 가능할까요?", "{date} {time:이} 좋겠어요."),
        ),
        (
            _o(
                "{c:은} {name} 이름으로 {date} {time}에 {dept} 진료를 예약했다.",
                _b("a", "네, {time:으로} 예약해 드렸습니다.", "{date} {time}에 예약되었습니다."),
            ),
            _o(
                "{c:은} {time}에 자리가 없어 {date} {time2}에 {dept} 진료를 예약했다.",
                _b(
                    "a",
                    "그 시간은 다 찼습니다. {time2}에는 가능합니다.",
                    "{time:은} 어렵고 {time2:은} 비어 있어요.",
                ),
                _b("c", "그럼 {time2:으로} 할게요.", "네, {time2}에 갈게요."),
            ),
        ),
    ),
    _Topic(
        "return",
        _slots("item price date reason"),
        _b("a", "어서 오세요. 무엇을 도와드릴까요?", "안녕하세요, 고객센터입니다."),
        (
            _b("c", "{date}에 산 {item:을} 반품하고 싶어요.", "{date}에 구입한 {item} 때문에 왔어요."),
            _b("a", "영수증 가지고 계세요?", "구매 내역을 확인해 볼게요. 영수증 있으세요?"),
            _b(
                "c",
                "네, 여기요. {price} 주고 샀어요.",
                "네, 카드로 {price:을} 결제했어요. 카드는 #CardNumber#예요.",
            ),
            _b("a", "어떤 문제가 있으셨나요?", "반품하시려는 이유가 뭔가요?"),
            _b("c", "{reason} 때문이에요.", "{reason} 때문에요."),
        ),
        (
            _o(
                "{c:은} {reason} 때문에 {date}에 {price}에 산 {item:을} 반품하고 환불받았다.",
                _b(
                    "a",
                    "네, {price} 전액 환불해 드리겠습니다.",
                    "확인됐습니다. {price:은} 카드로 환불해 드릴게요.",
                ),
            ),
            _o(
                "{c:은} {reason} 때문에 {price}짜리 {item:을} 환불하려 했지만 교환만 가능해 교환했다.",
                _b("a", "환불은 어렵고 교환은 가능합니다.", "구매 후 기간이 지나서 교환만 가능해요."),
                _b("c", "그럼 교환으로 할게요.", "어쩔 수 없죠. 교환해 주세요."),
            ),
        ),
    ),
    _Topic(
        "travel",
        _slots("city date nights count:people price:trip_price"),
        _b("a", "푸른여행사입니다. 어디로 가실 계획이세요?", "안녕하세요, 세계로 여행사입니다."),
        (
            _b(
                "c",
                "{date}에 출발하는 {city} {nights} 여행을 알아보고 있어요.",
                "{city:으로} {nights} 여행을 가려고 해요. {date} 출발이요.",
            ),
            _b("a", "몇 분이 가시나요?", "인원은 어떻게 되세요?"),
            _b("c", "저까지 {count:이에요}.", "{count:이} 갈 거예요."),
            _b(
                "a",
                "항공권과 숙소 포함 1인당 {price}입니다.",
                "{city} {nights} 상품은 한 명에 {price}입니다.",
            ),
        ),
        (
            _o(
                "{c:은} {date}에 떠나는 {city} {nights} 여행을 1인당 {price}에 {count} 예약했다.",
                _b("c", "좋아요, 그걸로 예약해 주세요.", "괜찮네요. 바로 예약할게요."),
                _b("a", "예약 확인서는 #Email#로 보내 드릴게요.", "네, {count} 예약 완료되었습니다."),
            ),
            _o(
                "{c:은} {date} 출발 {city} {nights} 여행이 1인당 {price:이라} 예약을 미뤘다.",
                _b("c", "생각보다 비싸네요. 좀 더 생각해 볼게요.", "가족과 상의하고 다시 연락드릴게요."),
                _b("a", "네, 언제든 연락 주세요.", "알겠습니다. 천천히 결정하세요."),
            ),
        ),
    ),
    _Topic(
        "interview",
        _slots("name company position years date"),
        None,
        (
            _b(
                "a",
                "{company} {position} 면접에 오신 걸 환영합니다.",
                "어서 오세요. {company} {position} 면접을 시작할게요.",
            ),
            _b("c", "안녕하세요, {name:이라고} 합니다.", "반갑습니다. 지원자 {name}입니다."),
            _b("a", "관련 경력이 있으신가요?", "이전 경력을 말씀해 주세요."),
            _b("c", "네, 전 회사에서 {years} 동안 일했습니다.", "{years} 정도 같은 일을 해 왔어요."),
            _b("a", "언제부터 출근할 수 있나요?", "입사하면 언제부터 일할 수 있어요?"),
            _b("c", "{date}부터 가능합니다.", "{date}부터는 언제든 출근할 수 있어요."),
        ),
        (
            _o(
                "{c:은} {company} {position} 면접에서 {years} 경력을 말했고 {date}부터 출근할 수 있다.",
                _b("a", "좋습니다. 결과는 #Email#로 알려 드릴게요.", "알겠습니다. 곧 연락드리겠습니다."),
            ),
            _o(
                "{a:은} {company} {position} 지원자 {name}의 {years} 경력을 보고 2차 면접을 제안했다.",
                _b(
                    "a",
                    "{years} 경력이면 충분하네요. 2차 면접을 봅시다.",
                    "인상적이네요. 2차 면접에 와 주세요.",
                ),
                _b("c", "네, 꼭 가겠습니다.", "감사합니다. 준비하겠습니다."),
            ),
        ),
    ),
    _Topic(
        "rental",
        _slots("district home deposit rent date"),
        _b("a", "{district} 부동산입니다.", "어서 오세요. 집 보러 오셨어요?"),
        (
            _b("c", "{district}에 {home:을} 구하고 있어요.", "{district} 쪽에 괜찮은 {home} 있을까요?"),
            _b(
                "a",
                "마침 {home} 하나가 보증금 {deposit}에 월세 {rent}입니다.",
                "보증금 {deposit}, 월세 {rent}인 집이 있어요.",
            ),
            _b("c", "언제부터 들어갈 수 있나요?", "입주는 언제 가능해요?"),
            _b("a", "{date}부터 입주 가능합니다.", "{date}부터 들어오실 수 있어요."),
        ),
        (
            _o(
                "{c:은} {district}에서 보증금 {deposit}, 월세 {rent}인 {home:을} 소개받았고 "
                "{date}부터 입주할 수 있다.",
                _b("c", "좋네요. 주말에 집을 보러 갈게요.", "마음에 들어요. 한번 보고 싶어요."),
            ),
            _o(
                "{c:은} {district}에서 월세 {rent}인 {home:을} 소개받았지만 비싸서 다른 집을 부탁했다.",
                _b("c", "월세가 좀 비싸네요. 다른 곳은 없나요?", "예산보다 높아요. 다른 집도 있을까요?"),
                _b("a", "그럼 다른 집도 알아봐 드릴게요.", "네, 더 찾아볼게요."),
            ),
        ),
    ),
    _Topic(
        "delivery",
        _slots("name item date delay:days date2:date"),
        _b("a", "고객센터입니다. 무엇을 도와드릴까요?", "안녕하세요, 상담원입니다."),
        (
            _b("c", "{date}에 주문한 {item:이} 아직 안 왔어요.", "{item:을} {date}에 주문했는데 안 와요."),
            _b("a", "주문자 성함을 알려 주세요.", "주문하신 분 성함이 어떻게 되세요?"),
            _b("c", "{name}이고 번호는 #PhoneNumber#예요.", "{name:이에요}. 주소는 #Address#입니다."),
            _b(
                "a",
                "물류 센터 사정으로 {delay} 정도 늦어지고 있습니다.",
                "죄송합니다. 배송이 {delay} 정도 지연되고 있어요.",
            ),
        ),
        (
            _o(
                "{c:은} {date}에 주문한 {item:이} {delay} 늦어져 {date2}까지 도착한다는 안내를 받았다.",
                _b("c", "그럼 언제 받을 수 있죠?", "언제쯤 도착할까요?"),
                _b("a", "{date2}까지는 도착할 겁니다.", "늦어도 {date2}까지는 받으실 수 있습니다."),
            ),
            _o(
                "{c:은} {date}에 주문한 {item}의 배송이 {delay} 늦어진다는 말에 주문을 취소했다.",
                _b("c", "너무 늦네요. 주문을 취소해 주세요.", "그렇게 오래는 못 기다려요. 취소할게요."),
                _b("a", "네, 취소하고 환불해 드리겠습니다.", "알겠습니다. 취소 처리해 드릴게요."),
            ),
        ),
    ),
    _Topic(
        "meeting",
        _slots("meeting date date2:date time room"),
        None,
        (
            _b("c", "{meeting} 회의 날짜를 정해야 할 것 같아요.", "다음 {meeting} 회의는 언제 할까요?"),
            _b("a", "언제가 좋을까요?", "저는 다 괜찮아요. 언제가 편하세요?"),
            _b(
                "c",
                "{date} {time} 어때요? 장소는 {room:으로} 하고요.",
                "{date} {time}에 {room}에서 하면 어때요?",
            ),
        ),
        (
            _o(
                "{c:과} {a:은} {date} {time}에 {room}에서 {meeting} 회의를 하기로 했다.",
                _b("a", "좋아요. #PersonName# 씨에게도 알려 줄게요.", "네, 그때 봬요."),
                _b("c", "네, {room:은} 제가 예약해 둘게요.", "고마워요. 자료는 미리 보낼게요."),
            ),
            _o(
                "{a:은} 출장 때문에 {meeting} 회의를 {date} 대신 {date2} {time:으로} 옮기자고 했다.",
                _b(
                    "a",
                    "{date}에는 출장이 있어요. {date2:은} 어때요?",
                    "그날은 출장 중이에요. {date2}에 할까요?",
                ),
                _b("c", "좋아요, 그럼 {date2} {time:으로} 하죠.", "네, {date2}에 봬요."),
            ),
        ),
    ),
    _Topic(
        "card",
        _slots("bank date store price days"),
        None,
        (
            _b("a", "{bank} 고객센터입니다.", "안녕하세요, {bank} 분실 신고 센터입니다."),
            _b("c", "카드를 잃어버려서 정지하려고요.", "지갑을 잃어버렸는데 카드부터 정지해야 할 것 같아요."),
            _b("a", "카드 번호를 알려 주시겠어요?", "본인 확인을 위해 카드 번호를 말씀해 주세요."),
            _b("c", "#CardNumber#입니다.", "번호는 #CardNumber#예요."),
            _b(
                "a",
                "{date}에 {store}에서 {price:이} 결제됐는데 쓰신 건가요?",
                "마지막 내역이 {date} {store} {price}인데 본인 결제인가요?",
            ),
        ),
        (
            _o(
                "{c:은} 잃어버린 {bank} 카드를 정지했고 {date} {store} 결제 {price:은} 본인 사용이며 "
                "새 카드는 {days} 뒤에 온다.",
                _b("c", "네, 그건 제가 쓴 거예요.", "맞아요. {store}에서 제가 결제했어요."),
                _b(
                    "a",
                    "새 카드는 {days} 정도 걸립니다.",
                    "정지했습니다. 새 카드는 {days} 뒤에 받으실 수 있어요.",
                ),
            ),
            _o(
                "{c:은} {bank} 카드를 잃어버렸는데 {date}에 {store}에서 {price:이} 결제되어 "
                "부정 사용 신고를 했다.",
                _b("c", "아니요, 저는 {store}에 간 적이 없어요.", "아니요, 제가 쓴 게 아니에요."),
                _b("a", "부정 사용으로 신고해 드리겠습니다.", "바로 정지하고 부정 사용 신고를 접수할게요."),
            ),
        ),
    ),
    _Topic(
        "lost",
        _slots("lost lost_place time"),
        _b("a", "유실물 센터입니다. 무엇을 도와드릴까요?", "안녕하세요, 분실물 접수처입니다."),
        (
            _b(
                "c",
                "오늘 {time}쯤 {lost_place}에서 {lost:을} 잃어버렸어요.",
                "{lost} 들어온 거 있나요? {time}쯤 {lost_place}에 두고 왔어요.",
            ),
            _b("a", "어떻게 생겼는지 설명해 주시겠어요?", "특징을 좀 말씀해 주세요."),
            _b("c", "안에 신분증이 들어 있어요.", "작은 열쇠고리가 달려 있어요.", "오래 써서 좀 낡았어요."),
        ),
        (
            _o(
                "{c:은} {time}쯤 {lost_place}에서 잃어버린 {lost:을} {a}의 도움으로 찾았다.",
                _b("a", "아, 비슷한 게 들어와 있네요.", "여기 있네요. 이거 맞나요?"),
                _b("c", "맞아요, 제 거예요! 감사합니다.", "네, 제 {lost}예요. 다행이에요."),
            ),
            _o(
                "{c:은} {time}쯤 {lost_place}에서 {lost:을} 잃어버렸지만 찾지 못해 연락처를 남겼다.",
                _b(
                    "a",
                    "아직 들어온 건 없네요. 연락처를 남겨 주세요.",
                    "지금은 없어요. 번호를 알려 주시면 연락드릴게요.",
                ),
                _b("c", "#PhoneNumber#로 연락 주세요.", "제 번호는 #PhoneNumber#예요."),
            ),
        ),
    ),
    _Topic(
        "school",
        _slots("name subject task date date2:date"),
        None,
        (
            _b(
                "c",
                "{name} 교수님, {subject} {task} 때문에 찾아왔습니다.",
                "{name} 교수님, {subject} {task} 문제로 여쭤볼 게 있어요.",
            ),
            _b("a", "무슨 일인가요?", "네, 말씀해 보세요."),
            _b(
                "c",
                "마감이 {date}인데 조금 연장해 주실 수 있을까요?",
                "아파서 {date}까지 내기가 어려울 것 같습니다.",
            ),
        ),
        (
            _o(
                "{c:은} {name} 교수에게 {subject} {task} 마감을 {date}에서 {date2:으로} 연장받았다.",
                _b("a", "사정이 있다면 {date2}까지 내도록 하세요.", "알겠어요. {date2}까지 제출하세요."),
                _b("c", "감사합니다. 꼭 그때까지 낼게요.", "정말 감사합니다, 교수님."),
            ),
            _o(
                "{c:은} {name} 교수에게 {subject} {task} 연장을 부탁했지만 거절당해 {date}까지 내야 한다.",
                _b("a", "미안하지만 형평성 때문에 연장은 안 됩니다.", "연장은 어려워요. 기한을 지켜 주세요."),
                _b("c", "알겠습니다. 최대한 맞춰 보겠습니다.", "네, 어떻게든 끝내 볼게요."),
            ),
        ),
    ),
    _Topic(
        "car",
        _slots("garage part price days"),
        None,
        (
            _b(
                "c",
                "{garage:이죠}? 차 {part:이} 이상해서 왔어요.",
                "{garage}에 점검 좀 받으러 왔어요. {part}에 문제가 있어요.",
            ),
            _b("a", "차량 번호가 어떻게 되세요?", "차량 번호부터 확인할게요."),
            _b("c", "#CarNumber#입니다.", "#CarNumber#예요. 저기 세워 뒀어요."),
            _b(
                "a",
                "{part:을} 교체해야 합니다. 비용은 {price}입니다.",
                "{part:은} 바꾸는 게 좋겠어요. 수리비는 {price}입니다.",
            ),
            _b("c", "시간은 얼마나 걸리나요?", "수리는 언제 끝나요?"),
            _b("a", "{days} 정도 걸립니다.", "부품이 오면 {days} 안에 끝나요."),
        ),
        (
            _o(
                "{c:은} {garage}에 {part} 수리를 맡겼고 비용은 {price}, 기간은 {days:이다}.",
                _b("c", "그럼 수리해 주세요.", "네, 맡길게요."),
            ),
            _o(
                "{c:은} {garage}에서 {part} 수리비가 {price:이라는} 말을 듣고 다른 곳도 알아보기로 했다.",
                _b(
                    "c",
                    "생각보다 비싸네요. 다른 곳에도 물어볼게요.",
                    "좀 비싸네요. 다른 정비소도 알아볼게요.",
                ),
            ),
        ),
    ),
    _Topic(
        "gym",
        _slots("sport months price weekdays time"),
        _b("a", "안녕하세요, 새봄 스포츠센터입니다.", "어서 오세요. 상담 도와드릴까요?"),
        (
            _b("c", "{sport} 수업을 등록하려고 왔어요.", "{sport:을} 배워 보고 싶은데요."),
            _b("a", "{months} 등록하시면 {price}입니다.", "{sport:은} {months}에 {price}입니다."),
            _b("c", "수업은 언제 있나요?", "수업 시간은 어떻게 돼요?"),
            _b("a", "{weekdays} {time}에 있어요.", "매주 {weekdays} {time}에 수업이 있습니다."),
        ),
        (
            _o(
                "{c:은} {sport} 수업을 {months}에 {price:으로} 등록했고 수업은 {weekdays} {time}에 있다.",
                _b("c", "좋아요. 카드로 결제할게요.", "그걸로 등록할게요."),
                _b("a", "등록되었습니다. 다음 주부터 나오세요.", "네, 결제 완료되었습니다."),
            ),
            _o(
                "{c:은} {sport} {months} 등록이 {price:이라는} 말을 듣고 "
                "{weekdays} 체험 수업부터 듣기로 했다.",
                _b("c", "먼저 체험 수업을 들어 볼 수 있을까요?", "등록 전에 한 번 들어 보고 싶어요."),
                _b("a", "네, 무료 체험 수업이 있어요.", "물론이죠. 체험 신청해 드릴게요."),
            ),
        ),
    ),
    _Topic(
        "internet",
        _slots("isp date time"),
        None,
        (
            _b("a", "{isp} 고객센터입니다.", "안녕하세요, {isp} 상담원입니다."),
            _b("c", "인터넷을 새로 설치하고 싶어요.", "이사를 해서 인터넷 설치를 신청하려고요."),
            _b("a", "설치하실 주소를 알려 주세요.", "설치 주소가 어떻게 되세요?"),
            _b("c", "#Address#입니다.", "주소는 #Address#예요."),
            _b("a", "언제 방문하면 될까요?", "기사님 방문 날짜를 정해 주세요."),
            _b("c", "{date} {time:이} 좋아요.", "{date} {time}에 집에 있어요."),
        ),
        (
            _o(
                "{c:은} {date} {time}에 #Address#에서 {isp} 인터넷 설치를 받기로 했다.",
                _b("a", "네, {date} {time}에 기사님이 방문합니다.", "{date} {time:으로} 예약되었습니다."),
            ),
        ),
    ),
    _Topic(
        "friends",
        _slots("show place date time"),
        None,
        (
            _b("c", "{date}에 같이 {show} 보러 갈래?", "너 {date}에 시간 있어? {show} 보러 가자."),
            _b("a", "좋아! 어디서 만날까?", "그래, 몇 시에 볼까?"),
            _b("c", "{place}에서 {time}에 만나자.", "{time}에 {place} 앞에서 보자."),
        ),
        (
            _o(
                "{c:과} {a:은} {date} {time}에 {place}에서 만나 {show:을} 보기로 했다.",
                _b("a", "좋아, 그때 봐.", "알겠어. 늦지 마!"),
            ),
            _o(
                "{c:과} {a:은} {date}에 {show:을} 보기로 했지만 {a:은} {time}보다 조금 늦게 {place}에 온다.",
                _b("a", "나 {time}에는 일이 있어서 좀 늦을 것 같아.", "{time:은} 좀 이른데 조금 늦어도 돼?"),
                _b("c", "괜찮아, 기다릴게.", "그래, 천천히 와."),
            ),
        ),
        casual=True,
    ),
)

_SMALL_TALK: tuple[tuple[str, str], ...] = (
    ("요즘 날씨가 많이 덥네요.", "네, 정말 그래요."),
    ("오늘 많이 바쁘시죠?", "네, 조금 정신이 없네요."),
    ("잠시만요, 메모 좀 할게요.", "네, 천천히 하세요."),
    ("목소리가 잘 안 들리는데 다시 말씀해 주시겠어요?", "네, 다시 말씀드릴게요."),
    ("아, 잠깐만요. 펜 좀 찾을게요.", "네, 기다릴게요."),
)
_CASUAL_SMALL_TALK: tuple[tuple[str, str], ...] = (
    ("요즘 어떻게 지내?", "그럭저럭 잘 지내."),
    ("오늘 진짜 덥다.", "그러게, 완전 여름이야."),
    ("잠깐만, 달력 좀 볼게.", "응, 천천히 봐."),
)
# Spoken by "c" then "a": the customer thanks, the service side says goodbye.
_CLOSINGS: tuple[tuple[str, str], ...] = (
    ("감사합니다.", "네, 좋은 하루 보내세요."),
    ("고마워요.", "별말씀을요. 안녕히 계세요."),
    ("알겠습니다. 수고하세요.", "네, 들어가세요."),
)
_THIRD_SPEAKER = (
    "저도 같이 들어도 될까요?",
    "잠깐 실례합니다. 여기 서명 부탁드려요.",
    "저도 그 얘기 들었어요.",
)

_SLOT_RE = re.compile(r"\{(\w+)(?::(\w+))?\}")
_MAX_TURNS = 10
_ROLES = ("c", "a")


def _ends_with_consonant(word: str, josa: str) -> bool:
    last = _SPEAKER_LAST_SYLLABLE.get(word, word[-1])
    if not "가" <= last <= "힣":
        raise ValueError(f"cannot choose a particle after {word!r}")
    final = (ord(last) - ord("가")) % 28
    # 으로 takes 로 after a vowel and after ㄹ (final consonant index 8).
    return final not in (0, 8) if josa == "으로" else final != 0


def _attach(word: str, josa: str | None) -> str:
    if josa is None:
        return word
    hard, soft = _JOSA[josa]
    return word + (hard if _ends_with_consonant(word, josa) else soft)


def _render(template: str, values: dict[str, str]) -> str:
    return _SLOT_RE.sub(lambda m: _attach(values[m.group(1)], m.group(2)), template)


def _template_slots(template: str) -> list[str]:
    return [m.group(1) for m in _SLOT_RE.finditer(template) if m.group(1) not in _ROLES]


def _summary_pattern(topic: _Topic, template: str) -> re.Pattern[str]:
    kinds = dict(topic.slots)
    seen: set[str] = set()
    parts: list[str] = []
    pos = 0
    for m in _SLOT_RE.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        slot, josa = m.group(1), m.group(2)
        if slot in seen:
            parts.append(f"(?P={slot})")
        else:
            seen.add(slot)
            options = SPEAKER_TOKENS if slot in _ROLES else _KINDS[kinds[slot]]
            alternatives = "|".join(re.escape(v) for v in sorted(options, key=len, reverse=True))
            parts.append(f"(?P<{slot}>{alternatives})")
        if josa is not None:
            parts.append("(?:" + "|".join(_JOSA[josa]) + ")")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts))


_SUMMARY_PATTERNS: tuple[tuple[_Topic, str, re.Pattern[str]], ...] = tuple(
    (topic, outcome.summary, _summary_pattern(topic, outcome.summary))
    for topic in _TOPICS
    for outcome in topic.outcomes
)


def _pick(rng: random.Random, beat: _Beat, values: dict[str, str]) -> tuple[str, str]:
    role, phrasings = beat
    return role, _render(rng.choice(phrasings), values)


def _make_example(rng: random.Random) -> tuple[str, str, dict[str, str]]:
    """Draw one example: (dialogue, summary, the slot values the summary uses)."""
    topic = rng.choice(_TOPICS)
    values: dict[str, str] = {}
    for slot, kind in topic.slots:
        taken = list(values.values())
        values[slot] = rng.choice([v for v in _KINDS[kind] if v not in taken])
    outcome = rng.choice(topic.outcomes)

    turns: list[tuple[str, str]] = []
    if topic.intro is not None and rng.random() < 0.5:
        turns.append(_pick(rng, topic.intro, values))
    first_role = turns[0][0] if turns else topic.beats[0][0]
    roles = {first_role: SPEAKER_TOKENS[0], ("a" if first_role == "c" else "c"): SPEAKER_TOKENS[1]}
    values.update({"c": roles["c"], "a": roles["a"]})
    turns.extend(_pick(rng, beat, values) for beat in (*topic.beats, *outcome.beats))

    # Extras never push a dialogue past _MAX_TURNS, which keeps sequences short for fast CPU training.
    # After a statement (not a question) a small-talk pair reads naturally and keeps speakers alternating.
    after_statement = [i + 1 for i, (_, text) in enumerate(turns[:-1]) if not text.endswith("?")]
    if after_statement and len(turns) + 2 <= _MAX_TURNS and rng.random() < 0.4:
        at = rng.choice(after_statement)
        nxt = turns[at][0]
        opener, reply = rng.choice(_CASUAL_SMALL_TALK if topic.casual else _SMALL_TALK)
        turns[at:at] = [(nxt, opener), ("a" if nxt == "c" else "c", reply)]
    if not topic.casual and turns[-1][0] == "a" and len(turns) + 2 <= _MAX_TURNS and rng.random() < 0.5:
        thanks, goodbye = rng.choice(_CLOSINGS)
        turns.extend([("c", thanks), ("a", goodbye)])

    lines = [f"{roles[role]}: {text}" for role, text in turns]
    if len(lines) < _MAX_TURNS and rng.random() < 0.1:
        lines.insert(rng.randint(2, len(lines) - 1), f"{SPEAKER_TOKENS[2]}: {rng.choice(_THIRD_SPEAKER)}")

    summary = _render(outcome.summary, values)
    used = {slot: values[slot] for slot in _template_slots(outcome.summary)}
    return "\n".join(lines), summary, used


def _examples(seed: int | str) -> Iterator[tuple[str, str, dict[str, str]]]:
    rng = random.Random(seed)
    while True:
        yield _make_example(rng)


def _rows_from(
    examples: Iterator[tuple[str, str, dict[str, str]]],
    n: int,
    prefix: str,
    exclude: frozenset[str] = frozenset(),
) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        dialogue, summary, _slots = next(examples)
        if dialogue not in exclude:
            rows.append({"fname": f"{prefix}_{len(rows):05d}", "dialogue": dialogue, "summary": summary})
    return rows


def generate_rows(n: int, seed: int, prefix: str = "train") -> list[dict[str, str]]:
    """Return `n` synthetic rows (fname, dialogue, summary); the same seed always gives the same rows."""
    if n < 0:
        raise UserError(f"row count must be >= 0, got {n}")
    return _rows_from(_examples(seed), n, prefix)


def summary_slots(summary: str) -> tuple[str, dict[str, str]]:
    """Return (topic name, slot values) of a generated summary, found by matching the summary templates."""
    for topic, _template, pattern in _SUMMARY_PATTERNS:
        m = pattern.fullmatch(summary)
        if m is not None:
            return topic.name, {k: v for k, v in m.groupdict().items() if k not in _ROLES}
    raise ValueError(f"not a synthetic summary: {summary!r}")


def topic_template_summary(row: dict[str, str]) -> str:
    """Return the row's summary with every slot value replaced by its kind's placeholder (speakers kept)."""
    for topic, template, pattern in _SUMMARY_PATTERNS:
        m = pattern.fullmatch(row["summary"])
        if m is not None:
            kinds = dict(topic.slots)
            values = {slot: _KINDS[kind][0] for slot, kind in kinds.items()}
            values.update({role: m.group(role) for role in _ROLES if role in pattern.groupindex})
            return _render(template, values)
    raise ValueError(f"not a synthetic summary: {row['summary']!r}")


def _atomic_write_text(path: Path, write: Callable[[TextIO], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_csv(path: Path | str, rows: Sequence[dict[str, str]]) -> None:
    """Write rows as a UTF-8 DialogSum CSV (fname,dialogue,summary), atomically via a temp file."""

    def write(f: TextIO) -> None:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: row[k] for k in COLUMNS} for row in rows)

    _atomic_write_text(Path(path), write)


def ensure_demo_data(out_dir: Path | str, train_rows: int, dev_rows: int, seed: int) -> tuple[Path, Path]:
    """Write train.csv/dev.csv under out_dir unless meta.json says they already match these settings."""
    out = Path(out_dir)
    train_path, dev_path, meta_path = out / "train.csv", out / "dev.csv", out / "meta.json"
    meta = {"version": GENERATOR_VERSION, "train_rows": train_rows, "dev_rows": dev_rows, "seed": seed}
    try:
        current = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        current = None
    if current == meta and train_path.is_file() and dev_path.is_file():
        return train_path, dev_path

    train = generate_rows(train_rows, seed, "train")
    # A separate stream for dev; a dev dialogue that happens to equal a train one is skipped.
    dev = _rows_from(_examples(f"{seed}:dev"), dev_rows, "dev", frozenset(r["dialogue"] for r in train))
    # The old sidecar goes first and the new one last, so an interrupted run leaves no meta vouching for
    # files it did not finish.
    meta_path.unlink(missing_ok=True)
    write_csv(train_path, train)
    write_csv(dev_path, dev)
    _atomic_write_text(meta_path, lambda f: f.write(json.dumps(meta, indent=2) + "\n"))
    return train_path, dev_path


def main(argv: list[str] | None = None) -> int:
    """CLI: write the synthetic train/dev CSVs and print their paths."""
    parser = argparse.ArgumentParser(prog="python -m loop.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--dev-rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.train_rows < 1 or args.dev_rows < 1:
        raise UserError("--train-rows and --dev-rows must be >= 1")
    for path in ensure_demo_data(args.out, args.train_rows, args.dev_rows, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
