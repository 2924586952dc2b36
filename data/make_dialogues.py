"""Write data/all.json: seeded synthetic Chinese doctor–patient dialogues with their eight medical elements.

The chapter trained on IMCS-21 consultations, which may not be redistributed, so the project ships this stand-in
instead. Each record is `{"dialogue_text": str, "extract_text": {the 8 keys}}`, shaped like the chapter's test set
(../shared/SPEC.md §5): `医生: …` / `患者: …` lines that all end in "\\n", 20–70 lines and 300–1,300 characters;
paediatric cases (a parent speaking) and adult ones, with small talk, hesitations, corrections and questions left
unanswered. The four list fields hold spans copied verbatim from the dialogue, in order of first mention and without
duplicates; the four text fields are short summaries of facts the dialogue states. Field emptiness follows the real
data. Record i depends only on (seed, i), so a shorter run is a prefix of a longer one, and a run is reproducible
byte for byte.

    python data/make_dialogues.py --output data/all.json --num_records 2500 --seed 1234
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass, field

# Run as `python data/make_dialogues.py`, only data/ is on the path; utils.py lives one level up.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from utils import EXTRACT_KEYS, LIST_KEYS, atomic_write_text  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    out = parser.add_argument_group("output")
    out.add_argument("--output", default="data/all.json", help="where to write the JSON array of records")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--num_records", type=int, default=2500, help="number of dialogues to generate")
    gen.add_argument("--seed", type=int, default=1234, help="random seed; the same seed gives the same bytes")
    args = parser.parse_args(argv)
    if args.num_records < 1:
        parser.error("--num_records must be at least 1")
    return args


# --------------------------------------------------------------------------------------------------------------
# Vocabulary. Drugs are grouped by "category[:subset]"; the category part names the spoken category terms below,
# the subset only decides which conditions may use the drug. "a|b" gives a drug a brand name or alias that a
# dialogue may use for a second mention. Marks after the name: "*" not given to children, "^" given by injection,
# "~" inhaled through a nebuliser; the other routes follow from the name.
# --------------------------------------------------------------------------------------------------------------

DRUGS: dict[str, str] = {
    "抗生素": "阿莫西林|阿莫仙 阿莫西林克拉维酸钾|安奇 头孢克洛|希刻劳 头孢克肟|世福素 头孢地尼|全泽复 头孢丙烯 "
              "头孢呋辛 头孢曲松^ 头孢噻肟^ 头孢他啶^ 头孢泊肟酯 头孢羟氨苄 头孢拉定 阿奇霉素|希舒美 红霉素 克拉霉素 "
              "罗红霉素 青霉素^ 氨苄西林^ 左氧氟沙星*|可乐必妥 莫西沙星* 环丙沙星* 克林霉素 多西环素* 米诺环素* "
              "乙酰螺旋霉素",
    "抗生素:泌尿": "磷霉素氨丁三醇 呋喃妥因 头孢克肟 阿莫西林克拉维酸钾 左氧氟沙星* 头孢呋辛酯",
    "抗生素:消化": "甲硝唑 替硝唑 阿莫西林 克拉霉素 头孢克肟 诺氟沙星*",
    "抗生素:耳鼻喉": "阿莫西林 头孢克洛 阿奇霉素 氧氟沙星滴耳液 头孢地尼 莫匹罗星软膏",
    "抗生素:眼": "妥布霉素滴眼液 左氧氟沙星滴眼液 红霉素眼膏 氧氟沙星眼膏",
    "抗生素:皮肤": "莫匹罗星软膏|百多邦 夫西地酸乳膏 红霉素软膏 头孢克洛",
    "抗病毒药": "奥司他韦|达菲 利巴韦林 玛巴洛沙韦 帕拉米韦^ 金刚乙胺* 干扰素~",
    "抗病毒药:皮肤": "阿昔洛韦 伐昔洛韦* 阿昔洛韦乳膏 喷昔洛韦乳膏 干扰素~",
    "抗病毒药:眼": "更昔洛韦眼用凝胶 阿昔洛韦滴眼液",
    "退烧药": "布洛芬|美林 对乙酰氨基酚|泰诺林 布洛芬混悬液 对乙酰氨基酚混悬滴剂 小儿布洛芬栓 赖氨匹林^ "
              "小儿氨酚烷胺颗粒 复方锌布颗粒",
    "止痛药": "洛索洛芬钠* 塞来昔布* 双氯芬酸钠* 布洛芬缓释胶囊|芬必得 氨酚曲马多*",
    "止咳药": "右美沙芬 小儿止咳糖浆 急支糖浆 川贝枇杷膏 肺力咳合剂 复方甘草片* 喷托维林 苏黄止咳胶囊* "
              "强力枇杷露 蛇胆川贝液 小儿肺热咳喘口服液 小儿消积止咳口服液 儿童清肺口服液 可愈糖浆 "
              "复方福尔可定口服溶液 小儿咳喘灵颗粒 宣肺止嗽合剂",
    "化痰药": "氨溴索|沐舒坦 乙酰半胱氨酸|富露施 桉柠蒎 羧甲司坦 溴己新 标准桃金娘油|吉诺通 氨溴特罗|易坦静 "
              "愈创甘油醚 氨溴索口服溶液",
    "抗过敏药": "氯雷他定|开瑞坦 西替利嗪|仙特明 左西替利嗪 孟鲁司特钠|顺尔宁 氯苯那敏|扑尔敏 酮替芬 依巴斯汀 "
                "地氯雷他定 咪唑斯汀* 赛庚啶 奥洛他定 氮卓斯汀鼻喷剂",
    "激素": "布地奈德~|普米克令舒 地塞米松^ 泼尼松 甲泼尼龙^ 氢化可的松^ 丙酸氟替卡松鼻喷雾剂|辅舒良 "
            "糠酸莫米松鼻喷雾剂|内舒拿 布地奈德鼻喷雾剂 倍氯米松",
    "激素:皮肤": "丁酸氢化可的松乳膏|尤卓尔 糠酸莫米松乳膏|艾洛松 地奈德乳膏 卤米松乳膏 曲安奈德益康唑乳膏 "
                 "氢化可的松乳膏",
    "支气管扩张剂": "沙丁胺醇|万托林 特布他林 异丙托溴铵~|爱全乐 丙卡特罗 氨茶碱 多索茶碱 班布特罗",
    "益生菌": "枯草杆菌二联活菌颗粒|妈咪爱 双歧杆菌三联活菌散|培菲康 布拉氏酵母菌散|亿活 酪酸梭菌二联活菌散 "
              "双歧杆菌乳杆菌三联活菌片|金双歧 整肠生 复方嗜酸乳杆菌片 "
              "凝结芽孢杆菌活菌片 双歧杆菌四联活菌片|思连康 罗伊氏乳杆菌滴剂",
    "止泻药": "蒙脱石散|思密达 消旋卡多曲 鞣酸蛋白 洛哌丁胺*|易蒙停 药用炭片",
    "电解质补充剂": "口服补液盐Ⅲ 口服补液盐散 葡萄糖电解质泡腾片",
    "助消化药": "健胃消食片 小儿健胃消食片 复方消化酶胶囊 乳酶生 多酶片 小儿化食丸 大山楂丸 保和丸 "
                "醒脾养儿颗粒 王氏保赤丸 小儿七星茶 四磨汤口服液 健儿清解液 胃蛋白酶合剂 复合乳酸菌胶囊 "
                "小儿消食颗粒 神曲消食口服液",
    "促胃动力药": "多潘立酮|吗丁啉 莫沙必利* 伊托必利* 马来酸曲美布汀",
    "通便药": "乳果糖|杜密克 开塞露 聚乙二醇4000散|福松 麻仁丸 小麦纤维素颗粒 比沙可啶* 麻仁软胶囊*",
    "抑酸药": "奥美拉唑* 雷贝拉唑* 泮托拉唑* 埃索美拉唑*|耐信 兰索拉唑* 法莫替丁* 雷尼替丁* 西咪替丁* "
              "艾普拉唑*",
    "胃黏膜保护剂": "铝碳酸镁|达喜 硫糖铝 枸橼酸铋钾* 瑞巴派特* 替普瑞酮* 胶体果胶铋* 磷酸铝凝胶 "
                    "L-谷氨酰胺呱仑酸钠颗粒",
    "解痉药": "山莨菪碱^ 匹维溴铵*|得舒特 颠茄片 间苯三酚^ 马来酸曲美布汀片",
    "止吐药": "昂丹司琼 甲氧氯普胺* 多潘立酮混悬液",
    "中成药:呼吸": "小儿豉翘清热颗粒 蒲地蓝消炎口服液 蓝芩口服液 连花清瘟胶囊 板蓝根颗粒 双黄连口服液 "
                   "抗病毒口服液 小儿柴桂退热颗粒 小柴胡颗粒 感冒清热颗粒 金银花露 银翘解毒片 小儿感冒颗粒 "
                   "开喉剑喷雾剂 馥感啉口服液 小儿热速清颗粒 清开灵颗粒 玉屏风颗粒 小儿肺咳颗粒 "
                   "金振口服液 小儿清热止咳口服液 复方鲜竹沥液 桔贝合剂 百蕊颗粒",
    "中成药:消化": "藿香正气水 香砂养胃丸 保济丸 四磨汤口服液 补中益气丸 枳术宽中胶囊 气滞胃痛颗粒 "
                   "胃苏颗粒 健脾丸 参苓白术散 葛根芩连丸 小儿止泻安颗粒",
    "中成药:泌尿": "三金片 热淋清颗粒 银花泌炎灵片 宁泌泰胶囊",
    "中成药:皮肤": "防风通圣丸 肤痒颗粒 湿毒清胶囊 消风止痒颗粒 除湿止痒软膏",
    "中成药:黄疸": "茵栀黄口服液 茵栀黄颗粒 退黄洗剂",
    "中成药:耳鼻喉": "鼻渊通窍颗粒 辛夷鼻炎丸 通窍鼻炎片 蓝芩口服液 金嗓子喉片 西瓜霜喷剂 康复新液 "
                     "口腔炎喷雾剂 开喉剑喷雾剂",
    "维生素": "维生素C 维生素D滴剂 维生素AD滴剂|伊可新 维生素B2 复合维生素B 维生素B6 多种维生素片 "
              "维生素B12",
    "锌剂": "葡萄糖酸锌口服液 甘草锌颗粒 硫酸锌口服溶液",
    "铁剂": "蛋白琥珀酸铁口服溶液 右旋糖酐铁口服液 多糖铁复合物胶囊 硫酸亚铁 富马酸亚铁 琥珀酸亚铁片",
    "钙剂": "碳酸钙D3颗粒 葡萄糖酸钙口服液 碳酸钙D3片|钙尔奇 乳酸钙颗粒",
    "外用药": "炉甘石洗剂 氧化锌软膏 鞣酸软膏 湿润烧伤膏 他克莫司软膏 硼酸洗液 尿素软膏 吡美莫司乳膏 "
              "护臀膏 紫草油",
    "抗真菌药": "制霉菌素 氟康唑* 特比萘芬乳膏 酮康唑乳膏 联苯苄唑乳膏 克霉唑乳膏 咪康唑乳膏 伊曲康唑*",
    "眼药": "玻璃酸钠滴眼液 典必殊 妥布霉素地塞米松眼膏 奥洛他定滴眼液 色甘酸钠滴眼液 聚乙烯醇滴眼液",
    "鼻腔用药": "生理性海水鼻腔喷雾器 赛洛唑啉 呋麻滴鼻液 盐酸羟甲唑啉喷雾剂 生理盐水滴鼻液",
}

# The terms a speaker uses for each category; any of them may occur, and each one that does is extracted.
CATEGORY_TERMS: dict[str, tuple[str, ...]] = {
    "抗生素": ("抗生素", "消炎药", "抗菌药", "抗菌素", "头孢类药物"),
    "抗病毒药": ("抗病毒药", "抗病毒的药", "抗病毒药物"),
    "退烧药": ("退烧药", "退热药", "解热镇痛药", "退烧的药"),
    "止痛药": ("止疼药", "止痛药", "非甾体抗炎药"),
    "止咳药": ("止咳药", "止咳糖浆", "镇咳药", "止咳的药"),
    "化痰药": ("化痰药", "祛痰药", "化痰的药", "稀释痰液的药"),
    "抗过敏药": ("抗过敏药", "抗组胺药", "抗过敏的药"),
    "激素": ("激素", "激素类药物", "糖皮质激素"),
    "支气管扩张剂": ("支气管扩张剂", "平喘药", "扩张支气管的药"),
    "益生菌": ("益生菌", "微生态制剂", "调节肠道菌群的药"),
    "止泻药": ("止泻药", "止泻的药", "收敛止泻药"),
    "电解质补充剂": ("电解质补充剂", "补液盐", "补充电解质的药"),
    "助消化药": ("助消化药", "消食的药", "帮助消化的药", "消化酶"),
    "促胃动力药": ("促胃动力药", "胃动力药", "促进胃动力的药"),
    "通便药": ("通便药", "缓泻剂", "软化大便的药", "泻药"),
    "抑酸药": ("抑酸药", "抑制胃酸的药", "质子泵抑制剂", "护胃药"),
    "胃黏膜保护剂": ("胃黏膜保护剂", "保护胃黏膜的药", "胃药"),
    "解痉药": ("解痉药", "解痉止痛的药", "缓解痉挛的药"),
    "止吐药": ("止吐药", "止吐的药"),
    "中成药": ("中成药", "中药", "清热解毒的中成药"),
    "维生素": ("维生素", "维生素类药物", "复合维生素"),
    "锌剂": ("锌剂", "补锌的药", "锌制剂"),
    "铁剂": ("铁剂", "补铁剂", "补铁的药"),
    "钙剂": ("钙剂", "补钙的药", "钙片"),
    "外用药": ("外用药", "外用药膏", "药膏"),
    "抗真菌药": ("抗真菌药", "抗真菌的药", "抗真菌药物"),
    "眼药": ("眼药水", "滴眼液", "眼药"),
    "鼻腔用药": ("滴鼻剂", "鼻喷剂", "鼻腔喷剂", "减充血剂"),
}


@dataclass(frozen=True)
class Drug:
    name: str
    category: str
    alias: str | None
    adult_only: bool
    route: str  # a key of ROUTES


# route -> (verb a speaker uses, summary patterns, doses for children, doses for adults)
ROUTES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "oral": ("吃", ("口服{}", "{}口服", "{}"),
             ("一次5毫升，一天三次", "一次半包，一天两次", "按体重吃，说明书上有", "一天两次，饭后吃",
              "一次2.5毫升，一天三次", "一次一包，一天三次", "早晚各一次"),
             ("一次一片，一天两次", "一天三次，饭后吃", "按说明书吃就行", "早晚各一次", "一次一袋，温水冲服",
              "饭前半小时吃", "每晚睡前一次")),
    "skin": ("涂", ("外用{}", "{}外涂"), ("一天两次，薄薄涂一层", "洗完澡以后涂", "涂在起疹子的地方，一天两三次"),
             ("一天两次，薄薄涂一层", "涂在患处，一天两三次", "晚上睡前涂")),
    "eye": ("滴", ("{}滴眼",), ("一次一滴，一天四次", "睡前用一次"), ("一次一到两滴，一天四次", "每两个小时一次")),
    "ear": ("滴", ("{}滴耳",), ("一次三滴，一天两次",), ("一次五滴，一天两次",)),
    "nose": ("喷", ("{}喷鼻",), ("每个鼻孔一喷，一天一次", "早晚各喷一次"), ("每侧两喷，一天一次", "早晚各喷一次")),
    "throat": ("喷", ("{}喷喉",), ("一天喷三四次", "饭后喷一下"), ("一天喷三四次", "饭后喷一下")),
    "rectal": ("用", ("{}纳肛",), ("需要的时候用一支", "体温高的时候用一粒"), ("需要的时候用一支",)),
    "inj": ("用", ("{}静滴", "{}治疗"), ("要在医院用，剂量按体重算", "一天一次，连用三天"),
            ("要在医院用", "一天一次，连用三到五天")),
    "inh": ("用", ("{}雾化吸入",), ("一次一支，一天两次", "早晚各一次"), ("一次一支，一天两次",)),
}


def _route(name: str, marks: str) -> str:
    if "^" in marks:
        return "inj"
    if "~" in marks:
        return "inh"
    if name.endswith(("滴眼液", "眼膏", "眼用凝胶")) or name == "典必殊":
        return "eye"
    if name.endswith("滴耳液"):
        return "ear"
    if "鼻" in name and ("喷" in name or "滴" in name) or name in ("赛洛唑啉", "盐酸羟甲唑啉喷雾剂"):
        return "nose"
    if name.endswith(("喷雾剂", "喷剂")):
        return "throat"
    if name.endswith(("软膏", "乳膏", "洗剂", "洗液", "护臀膏")) or name == "紫草油":
        return "skin"
    if "栓" in name or name == "开塞露":
        return "rectal"
    return "oral"


def _parse_drugs() -> dict[str, list[Drug]]:
    table: dict[str, list[Drug]] = {}
    for key, names in DRUGS.items():
        category = key.split(":")[0]
        drugs = []
        for token in names.split():
            marked, _, alias = token.partition("|")
            name = marked.rstrip("*^~")
            marks = marked[len(name):]
            drugs.append(Drug(name, category, alias or None, "*" in marks, _route(name, marks)))
        table[key] = drugs
    return table


DRUG_TABLE = _parse_drugs()

# Symptoms: summary term -> (phrases a patient uses for it, yes/no questions a doctor asks, the summary when it is
# denied, and how a patient denies it).
SYMPTOMS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str, tuple[str, ...]]] = {
    "咳嗽": (("咳嗽", "一直咳", "咳得挺厉害", "老是咳嗽", "干咳", "一阵一阵地咳"),
             ("咳嗽吗？", "咳得厉害吗？", "平时咳不咳嗽？"), "无咳嗽", ("不咳", "没怎么咳", "没听见咳")),
    "咳痰": (("有痰", "嗓子里有痰", "咳的时候有痰", "痰挺多", "能咳出黄痰"),
             ("有痰吗？", "咳嗽带痰吗？", "嗓子里有没有痰？"), "无痰", ("没痰，是干咳", "听着没什么痰")),
    "流涕": (("流鼻涕", "流清鼻涕", "流黄鼻涕", "鼻涕特别多"),
             ("流不流鼻涕？", "有没有鼻涕？"), "无流涕", ("不流鼻涕", "没见流鼻涕")),
    "鼻塞": (("鼻塞", "鼻子不通气", "鼻子堵得慌", "晚上鼻子堵"),
             ("鼻子通气吗？", "鼻塞严重吗？", "睡觉时鼻子堵不堵？"), "无鼻塞", ("鼻子是通的", "不堵")),
    "发热": (("发烧", "发热", "烧起来了", "反复发烧"),
             ("这几天发烧了吗？", "发不发热？"), "无发热", ("不烧", "没发烧，量了都正常", "体温一直正常")),
    "咽痛": (("嗓子疼", "喉咙痛", "咽东西疼", "嗓子又干又疼"),
             ("嗓子疼不疼？", "咽口水疼吗？", "喉咙痛不痛？"), "无咽痛", ("不疼", "嗓子不疼")),
    "打喷嚏": (("打喷嚏", "老打喷嚏", "早上起来喷嚏不断"),
               ("打喷嚏多吗？", "有没有打喷嚏？"), "无喷嚏", ("不怎么打", "没打喷嚏")),
    "喘息": (("喘", "呼吸的时候有呼噜声", "嗓子里呼噜呼噜的", "喘气有声音"),
             ("喘不喘？", "呼吸的时候有没有喘鸣音？", "呼吸急不急？"), "无喘息", ("不喘", "呼吸挺平稳的")),
    "声音嘶哑": (("嗓子哑了", "声音沙哑", "说话声音哑"), ("声音哑吗？", "说话嗓子哑不哑？"), "无声嘶",
                 ("声音正常", "不哑")),
    "呕吐": (("吐", "吐奶", "恶心想吐", "吃了就吐"), ("吐过吗？", "有没有呕吐？", "恶心想吐吗？"), "无呕吐",
             ("没吐过", "不吐")),
    "腹泻": (("拉肚子", "大便稀", "一天拉好几次", "拉水样便"),
             ("拉肚子吗？", "大便稀不稀？"), "无腹泻", ("大便正常", "没拉肚子", "大便成形的")),
    "腹痛": (("肚子疼", "喊肚子疼", "肚脐周围疼"), ("肚子疼吗？", "有没有腹痛？"), "无腹痛",
             ("没喊肚子疼", "肚子不疼")),
    "腹胀": (("肚子胀", "肚子鼓鼓的", "老放屁"), ("肚子胀吗？", "有没有腹胀？"), "无腹胀", ("肚子软软的", "不胀")),
    "便秘": (("大便干", "好几天不拉", "拉屎特别费劲", "大便像羊屎蛋"),
             ("大便干不干？", "解大便费劲吗？"), "大便正常", ("不干", "每天都拉，挺顺的")),
    "食欲差": (("不爱吃饭", "吃得少", "胃口不好", "奶量下降"),
               ("胃口差吗？", "吃得比平时少吗？"), "食欲可", ("胃口还行", "吃得跟平时差不多")),
    "口臭": (("嘴里有味", "口气重", "早上起来嘴巴臭"), ("有没有口臭？", "口气重不重？"), "无口臭",
             ("没闻到", "嘴里没味")),
    "皮疹": (("起疹子", "身上起红点", "长了好多小红疙瘩", "起了一片红疹"),
             ("身上有没有疹子？", "出疹子了吗？"), "无皮疹", ("皮肤光溜溜的", "没看到疹子")),
    "瘙痒": (("痒", "老是挠", "痒得睡不着"), ("痒不痒？", "会不会老去挠？"), "无瘙痒", ("不痒", "没见挠")),
    "精神差": (("没精神", "蔫蔫的", "老想睡觉", "不爱玩"), ("精神差吗？", "人蔫不蔫？"), "精神可",
               ("精神挺好的", "该玩玩，精神不错")),
    "耳痛": (("耳朵疼", "老揪耳朵", "耳朵里流水"), ("耳朵疼吗？", "有没有揪耳朵？"), "无耳痛",
             ("耳朵没事", "不揪")),
    "打鼾": (("打呼噜", "晚上睡觉打鼾", "睡觉憋气"), ("睡觉打呼噜吗？", "晚上打鼾吗？"), "无打鼾",
             ("睡觉挺安静的", "不打")),
    "张口呼吸": (("张着嘴睡觉", "睡觉嘴巴张着"), ("睡觉张嘴呼吸吗？",), "无张口呼吸", ("嘴巴闭着的",)),
    "尿频": (("老上厕所", "尿得勤", "一会儿就想尿"), ("小便次数多吗？", "尿频吗？"), "无尿频",
             ("次数跟平时一样", "不频")),
    "尿痛": (("小便疼", "尿尿的时候疼", "尿的时候火辣辣的"), ("小便疼不疼？", "排尿痛吗？"), "无尿痛",
             ("不疼", "尿的时候不疼")),
    "反酸": (("反酸水", "嘴里发酸", "酸水往上冒"), ("反酸吗？", "有没有反酸？"), "无反酸", ("不反酸",)),
    "烧心": (("烧心", "胸口火辣辣的"), ("烧心吗？", "胸口有烧灼感吗？"), "无烧心", ("不烧心",)),
    "胃痛": (("胃疼", "胃里隐隐作痛", "上腹部疼"), ("胃疼吗？", "上腹部疼不疼？"), "无胃痛", ("胃不疼",)),
    "嗳气": (("老打嗝", "饭后打嗝"), ("打嗝多吗？", "嗳气吗？"), "无嗳气", ("不怎么打嗝",)),
    "皮肤黄染": (("皮肤黄", "脸发黄", "眼白有点黄", "身上黄黄的"), ("黄疸明显吗？", "身上黄不黄？"), "无黄染",
                 ("不怎么黄", "看着不黄")),
    "眼红": (("眼睛红", "眼屎多", "眼睛发红流泪"), ("眼睛红吗？", "眼屎多不多？"), "无眼红", ("眼睛不红",)),
    "头晕": (("头晕", "头有点晕", "起身的时候眼前发黑"), ("头晕吗？", "有没有头晕？"), "无头晕", ("不晕",)),
    "乏力": (("没劲", "浑身乏力", "容易累"), ("乏力吗？", "容易累吗？"), "无乏力", ("有劲", "不累")),
    "口腔疱疹": (("嘴里长泡", "嗓子里有小白泡", "嘴里有溃疡"), ("嘴里有没有疱疹？", "口腔里长东西了吗？"),
                 "口腔无疱疹", ("嘴里没看到", "没长")),
    "手足疹": (("手心脚心有红疹", "手上脚上起了小疹子"), ("手心脚心有疹子吗？",), "手足无皮疹", ("手脚上没有",)),
    "全身酸痛": (("浑身酸疼", "身上疼", "骨头疼"), ("身上酸痛吗？",), "无全身酸痛", ("身上不疼",)),
    "面色苍白": (("脸色发白", "脸色不好", "嘴唇发白"), ("脸色发白吗？",), "面色可", ("脸色红润",)),
    "哭闹": (("哭闹", "晚上哭闹不睡", "一阵一阵地哭"), ("哭闹厉害吗？",), "无哭闹", ("挺乖的，不怎么哭",)),
}

# Exams: name -> verb used with it, and results as (what the patient says, how the summary puts it).
BARE_RESULTS = ("正常", "未见异常", "未见明显异常", "阴性", "阳性", "偏高")  # meaningless without the exam's name
GENERIC_RESULTS = (("医生说没什么问题", "未见明显异常"), ("结果都正常", "正常"), ("说是正常的", "未见异常"))
EXAMS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "血常规": ("查", (("白细胞有点高", "白细胞偏高"), ("白细胞一万三", "白细胞13×10^9/L"),
                     ("淋巴细胞偏高", "淋巴细胞比例升高"), ("中性粒细胞高", "中性粒细胞升高"),
                     ("血色素有点低", "血红蛋白偏低"), ("白细胞偏低", "白细胞减少"))),
    "血象": ("查", (("血象有点高", "血象偏高"), ("血象不高", "血象不高"))),
    "C反应蛋白": ("查", (("C反应蛋白高了", "C反应蛋白升高"), ("C反应蛋白正常", "C反应蛋白正常"))),
    "CRP": ("查", (("CRP是二十多", "CRP升高"), ("CRP不高", "CRP正常"))),
    "降钙素原": ("查", (("降钙素原不高", "降钙素原正常"),)),
    "胸片": ("拍", (("说肺纹理增粗", "肺纹理增粗"), ("片子上没看到肺炎", "未见肺炎"),
                   ("说有点支气管炎", "提示支气管炎"))),
    "肺部CT": ("做", (("说有片状阴影", "见片状阴影"), ("CT没什么问题", "未见异常"))),
    "胸部CT": ("做", (("说有小结节", "见小结节"), ("说是正常的", "未见异常"))),
    "肺部听诊": ("做", (("医生说有痰鸣音", "可闻及痰鸣音"), ("听着肺里挺干净", "双肺呼吸音清"),
                       ("说有点湿啰音", "可闻及湿啰音"))),
    "支原体抗体": ("查", (("支原体阳性", "支原体抗体阳性"), ("支原体是阴性", "支原体抗体阴性"))),
    "甲流抗原": ("查", (("甲流是阳性", "甲流抗原阳性"), ("甲流阴性", "甲流抗原阴性"))),
    "呼吸道病原体检测": ("做", (("说是合胞病毒", "呼吸道合胞病毒阳性"), ("都是阴性", "阴性"))),
    "咽拭子": ("做", (("咽拭子没查出来什么", "阴性"),)),
    "肺功能": ("做", (("说小气道有点问题", "小气道功能下降"), ("肺功能正常", "正常"))),
    "大便常规": ("查", (("有白细胞", "白细胞阳性"), ("有脂肪球", "脂肪球阳性"), ("说没问题", "未见异常"),
                       ("潜血弱阳性", "潜血弱阳性"))),
    "便常规": ("查", (("里面有红细胞", "见红细胞"), ("化验正常", "正常"))),
    "轮状病毒检测": ("做", (("轮状病毒阳性", "轮状病毒阳性"), ("轮状病毒阴性", "轮状病毒阴性"))),
    "诺如病毒检测": ("做", (("诺如阳性", "诺如病毒阳性"),)),
    "腹部B超": ("做", (("说肠子里有气", "肠胀气"), ("B超没事", "未见异常"))),
    "腹部彩超": ("做", (("说肠系膜淋巴结有点大", "肠系膜淋巴结肿大"), ("彩超正常", "未见异常"))),
    "电解质": ("查", (("钾有点低", "血钾偏低"), ("电解质正常", "正常"))),
    "尿常规": ("查", (("尿里白细胞很多", "白细胞升高"), ("有潜血", "潜血阳性"), ("尿常规正常", "正常"))),
    "尿培养": ("做", (("培养出大肠杆菌", "大肠埃希菌阳性"),)),
    "泌尿系B超": ("做", (("B超没看到结石", "未见结石"),)),
    "胃镜": ("做", (("说是浅表性胃炎", "慢性浅表性胃炎"), ("胃里有点糜烂", "胃窦糜烂"), ("说有个小溃疡", "胃溃疡"))),
    "碳13呼气试验": ("做", (("幽门螺杆菌阳性", "幽门螺杆菌阳性"), ("是阴性的", "阴性"))),
    "碳14呼气试验": ("做", (("数值是阳性", "阳性"),)),
    "肝功能": ("查", (("转氨酶有点高", "转氨酶轻度升高"), ("肝功能正常", "正常"))),
    "过敏原检测": ("做", (("说对尘螨过敏", "尘螨过敏"), ("牛奶蛋白过敏", "牛奶蛋白过敏"), ("没查出过敏原", "阴性"))),
    "血清总IgE": ("查", (("IgE偏高", "总IgE升高"),)),
    "真菌镜检": ("做", (("查到真菌了", "真菌阳性"), ("没找到真菌", "阴性"))),
    "耳镜检查": ("做", (("说鼓膜充血", "鼓膜充血"), ("说耳朵里有积液", "中耳积液"))),
    "鼻内镜": ("做", (("说鼻甲肥大", "下鼻甲肥大"), ("说有脓涕", "见脓性分泌物"))),
    "鼻咽侧位片": ("拍", (("说腺样体堵了三分之二", "腺样体肥大，堵塞约2/3"),)),
    "听力检查": ("做", (("听力正常", "正常"),)),
    "经皮胆红素": ("测", (("测的是十五", "经皮胆红素15mg/dl"), ("说有点高", "偏高"))),
    "血清胆红素": ("查", (("胆红素二百多", "总胆红素升高"),)),
    "血红蛋白": ("查", (("只有九十多", "血红蛋白偏低"), ("一百零五", "血红蛋白105g/L"))),
    "血清铁蛋白": ("查", (("铁蛋白很低", "铁蛋白降低"),)),
    "微量元素": ("查", (("说缺锌", "锌偏低"), ("说缺铁", "铁偏低"), ("微量元素正常", "正常"))),
    "眼科检查": ("做", (("说结膜充血", "结膜充血"),)),
    "心电图": ("做", (("心电图正常", "正常"),)),
    "肾功能": ("查", (("肌酐正常", "肌酐正常"), ("肾功能没问题", "正常"))),
}

# Operations: name -> how it is said ("v" a verb: 雾化了三天; "n" a noun: 做了物理降温).
OPERATIONS: dict[str, str] = {
    "雾化": "v", "雾化吸入": "n", "输液": "v", "打点滴": "v", "吊水": "v", "打针": "v", "肌注": "v",
    "抽血": "v", "灌肠": "v", "洗鼻": "v", "鼻腔冲洗": "n", "吸痰": "v", "拍背": "v", "推拿": "v",
    "小儿推拿": "n", "针灸": "v", "艾灸": "v", "物理降温": "n", "温水擦浴": "n", "冷敷": "v", "热敷": "v",
    "湿敷": "v", "照蓝光": "v", "蓝光照射": "n", "吸氧": "v", "静脉补液": "n", "腺样体切除术": "n",
    "扁桃体切除术": "n", "手术": "n", "拔罐": "v", "刮痧": "v", "穴位贴敷": "n", "冲洗眼睛": "v",
    "鼓膜穿刺": "n", "留置针": "n", "补液": "v", "按摩腹部": "v", "捏脊": "v", "换药": "v",
}


@dataclass(frozen=True)
class Group:
    drugs: tuple[str, ...]
    exams: tuple[str, ...]
    ops: tuple[str, ...]
    negatives: tuple[str, ...]
    advice: tuple[tuple[str, str], ...]  # (what the doctor says, summary)


GROUPS: dict[str, Group] = {
    "呼吸": Group(
        drugs=("抗生素", "抗病毒药", "退烧药", "止咳药", "化痰药", "抗过敏药", "激素", "支气管扩张剂",
               "中成药:呼吸", "益生菌", "维生素"),
        exams=("血常规", "血象", "C反应蛋白", "CRP", "胸片", "肺部CT", "肺部听诊", "支原体抗体", "甲流抗原",
               "呼吸道病原体检测", "咽拭子", "降钙素原", "肺功能", "过敏原检测", "胸部CT"),
        ops=("雾化", "雾化吸入", "输液", "打点滴", "吊水", "拍背", "吸痰", "洗鼻", "物理降温", "打针", "吸氧",
             "抽血", "小儿推拿", "穴位贴敷", "留置针"),
        negatives=("发热", "呕吐", "腹泻", "喘息", "精神差", "皮疹", "咽痛", "食欲差"),
        advice=(("多喝温水", "多饮水"), ("饮食清淡点，少吃油腻甜食", "清淡饮食"), ("注意保暖，别着凉", "注意保暖"),
                ("多休息，别太累", "注意休息"), ("屋里经常开窗通通风", "保持室内通风"),
                ("这段时间少去人多的地方", "避免去人多的场所"), ("咳嗽的时候轻轻拍一拍后背，帮着把痰排出来", "拍背排痰"),
                ("晚上睡觉把枕头稍微垫高一点", "睡觉时抬高头部"), ("屋里太干的话开个加湿器", "保持室内湿度"),
                ("体温超过38.5度再考虑用药退热", "体温超过38.5℃时药物退热"), ("如果出现呼吸急促要马上去医院", "呼吸急促及时就医"),
                ("三天后还咳得厉害就去医院复查", "3天后复诊")),
    ),
    "耳鼻喉": Group(
        drugs=("抗生素:耳鼻喉", "抗过敏药", "激素", "鼻腔用药", "中成药:耳鼻喉", "退烧药", "抗病毒药", "止痛药"),
        exams=("耳镜检查", "鼻内镜", "鼻咽侧位片", "听力检查", "血常规", "过敏原检测", "血清总IgE", "咽拭子"),
        ops=("洗鼻", "鼻腔冲洗", "雾化", "腺样体切除术", "扁桃体切除术", "手术", "鼓膜穿刺", "输液", "针灸"),
        negatives=("发热", "咳嗽", "耳痛", "流涕", "咽痛", "打鼾"),
        advice=(("每天用生理盐水冲一冲鼻子", "生理盐水冲鼻"), ("少吃辛辣刺激的东西", "忌辛辣刺激饮食"),
                ("远离花粉和尘螨，被褥勤晒", "避免接触过敏原"), ("水要多喝，少说话，让嗓子歇一歇", "多饮水，少说话"),
                ("洗头洗澡时别让耳朵进水", "避免耳内进水"), ("坚持用药两周再看效果", "规律用药2周后复诊"),
                ("平时加强锻炼，增强抵抗力", "加强锻炼"), ("出门戴口罩", "外出佩戴口罩")),
    ),
    "消化": Group(
        drugs=("益生菌", "止泻药", "电解质补充剂", "助消化药", "通便药", "促胃动力药", "止吐药", "抗生素:消化",
               "中成药:消化", "锌剂", "退烧药"),
        exams=("大便常规", "便常规", "轮状病毒检测", "诺如病毒检测", "腹部B超", "腹部彩超", "血常规", "电解质",
               "过敏原检测", "微量元素"),
        ops=("输液", "静脉补液", "补液", "灌肠", "推拿", "小儿推拿", "热敷", "按摩腹部", "捏脊", "艾灸", "抽血"),
        negatives=("发热", "呕吐", "腹痛", "精神差", "腹胀", "咳嗽"),
        advice=(("饮食要清淡，少量多餐", "清淡饮食，少量多餐"), ("注意补充水分，防止脱水", "多饮水，防脱水"),
                ("注意观察小便量", "观察尿量"), ("多吃点蔬菜水果，补充膳食纤维", "多吃蔬菜水果"),
                ("顺时针给揉揉肚子", "顺时针按摩腹部"), ("肚子注意保暖", "腹部保暖"),
                ("奶瓶餐具要消毒", "餐具消毒"), ("暂时别吃生冷的东西", "忌生冷饮食"),
                ("养成定时排便的习惯", "定时排便"), ("如果出现精神不好、尿少要及时就医", "精神差、尿少时及时就医")),
    ),
    "胃": Group(
        drugs=("抑酸药", "胃黏膜保护剂", "促胃动力药", "解痉药", "抗生素:消化", "益生菌", "中成药:消化", "助消化药"),
        exams=("胃镜", "碳13呼气试验", "碳14呼气试验", "腹部彩超", "肝功能", "血常规", "大便常规", "心电图"),
        ops=("针灸", "热敷", "艾灸", "输液", "抽血", "拔罐"),
        negatives=("呕吐", "腹泻", "发热", "反酸", "嗳气", "头晕"),
        advice=(("三餐规律，别饥一顿饱一顿", "规律饮食"), ("戒烟戒酒", "戒烟酒"), ("少喝咖啡浓茶", "少饮咖啡浓茶"),
                ("吃完饭别马上躺下", "餐后避免立即平卧"), ("少吃辛辣油炸的", "忌辛辣油炸食物"),
                ("放松心情，别太焦虑", "保持心情舒畅"), ("吃药一个月后复查", "服药1月后复查"),
                ("晚饭别吃太饱", "晚餐不宜过饱")),
    ),
    "皮肤": Group(
        drugs=("抗过敏药", "激素:皮肤", "外用药", "抗真菌药", "抗病毒药:皮肤", "中成药:皮肤", "维生素",
               "抗生素:皮肤", "退烧药"),
        exams=("过敏原检测", "血常规", "真菌镜检", "血清总IgE", "微量元素"),
        ops=("冷敷", "湿敷", "换药", "抽血", "输液", "打针"),
        negatives=("发热", "瘙痒", "咳嗽", "精神差", "腹泻"),
        advice=(("洗澡水别太热，洗完抹点保湿霜", "温水洗浴，加强保湿"), ("穿宽松的纯棉衣服", "穿纯棉宽松衣物"),
                ("指甲剪短，别让抓破了", "剪短指甲避免抓挠"), ("暂时别吃海鲜和辛辣的", "忌海鲜辛辣"),
                ("保持皮肤干爽", "保持皮肤干燥"), ("找找过敏的原因，尽量避开", "寻找并避免过敏原"),
                ("疹子没消退前别去幼儿园", "皮疹消退前居家隔离"), ("一周后看看恢复情况", "1周后复诊")),
    ),
    "泌尿": Group(
        drugs=("抗生素:泌尿", "中成药:泌尿", "退烧药"),
        exams=("尿常规", "尿培养", "泌尿系B超", "血常规", "肾功能"),
        ops=("输液", "打针", "抽血", "热敷"),
        negatives=("发热", "腹痛", "呕吐", "尿痛", "尿频"),
        advice=(("水要多喝，勤排尿，别憋尿", "多饮水，勤排尿"), ("注意个人卫生，勤换内裤", "注意会阴部卫生"),
                ("药要吃够疗程，别症状好了就停", "足疗程用药"), ("吃完药再去复查一下", "疗程结束后复查"),
                ("少吃辛辣的", "忌辛辣"), ("别穿太紧的裤子", "避免穿紧身裤")),
    ),
    "眼": Group(
        drugs=("抗生素:眼", "抗病毒药:眼", "眼药", "抗过敏药"),
        exams=("眼科检查", "血常规", "过敏原检测"),
        ops=("冷敷", "热敷", "冲洗眼睛"),
        negatives=("发热", "流涕", "咳嗽", "瘙痒"),
        advice=(("别用手揉眼睛", "勿揉眼"), ("毛巾脸盆单独用", "毛巾专人专用"), ("少看手机电视", "减少用眼"),
                ("勤洗手", "勤洗手"), ("三天不好转去眼科看看", "3天无好转眼科就诊")),
    ),
    "血液": Group(
        drugs=("铁剂", "维生素", "钙剂", "锌剂"),
        exams=("血常规", "血红蛋白", "血清铁蛋白", "微量元素", "大便常规"),
        ops=("抽血", "输液"),
        negatives=("发热", "头晕", "乏力", "食欲差"),
        advice=(("多吃红肉、动物肝脏这些含铁多的", "多食含铁丰富食物"), ("药饭后吃，减少对胃的刺激", "餐后服药"),
                ("喝点橙汁帮助铁吸收", "多吃富含维C的水果"), ("一个月后去复查一下", "1月后复查血常规"),
                ("药别和牛奶一起吃", "勿与牛奶同服")),
    ),
    "黄疸": Group(
        drugs=("益生菌", "中成药:黄疸", "维生素"),
        exams=("经皮胆红素", "血清胆红素", "血常规", "肝功能", "腹部B超"),
        ops=("照蓝光", "蓝光照射", "抽血"),
        negatives=("发热", "呕吐", "腹泻", "哭闹"),
        advice=(("多喂奶，多排便，黄疸退得快", "勤喂养促进排便"), ("白天在窗边晒晒太阳，注意别晒着眼睛", "适当晒太阳"),
                ("观察大便颜色，发白要及时就医", "观察大便颜色"), ("过两三天再测一下胆红素", "2-3天后复测胆红素"),
                ("吃奶差或者黄疸加重随时去医院", "黄疸加重及时就医")),
    ),
}


@dataclass(frozen=True)
class Condition:
    diagnoses: tuple[str, ...]  # the first is the summary's name; others are what a doctor may say
    group: str
    who: str  # "infant", "child", "adult", "any"
    course: str  # "acute", "subacute", "chronic"
    symptoms: tuple[str, ...]  # the first is the chief complaint


CONDITIONS: tuple[Condition, ...] = (
    Condition(("上呼吸道感染", "上感", "感冒"), "呼吸", "any", "acute", ("流涕", "咳嗽", "鼻塞", "发热", "咽痛", "打喷嚏")),
    Condition(("急性支气管炎", "支气管炎"), "呼吸", "any", "acute", ("咳嗽", "咳痰", "发热", "喘息")),
    Condition(("支气管肺炎", "肺炎"), "呼吸", "child", "acute", ("咳嗽", "发热", "咳痰", "喘息", "精神差")),
    Condition(("社区获得性肺炎", "肺炎"), "呼吸", "adult", "acute", ("咳嗽", "发热", "咳痰", "乏力")),
    Condition(("肺炎支原体感染", "支原体感染"), "呼吸", "child", "subacute", ("咳嗽", "发热", "咳痰")),
    Condition(("毛细支气管炎",), "呼吸", "infant", "acute", ("咳嗽", "喘息", "流涕", "呕吐")),
    Condition(("咳嗽变异性哮喘", "过敏性咳嗽"), "呼吸", "child", "chronic", ("咳嗽", "打喷嚏")),
    Condition(("支气管哮喘", "哮喘"), "呼吸", "any", "chronic", ("喘息", "咳嗽")),
    Condition(("流行性感冒", "流感"), "呼吸", "any", "acute", ("发热", "全身酸痛", "咳嗽", "咽痛")),
    Condition(("病毒性感冒", "病毒感染"), "呼吸", "any", "acute", ("发热", "流涕", "咳嗽")),
    Condition(("幼儿急疹",), "皮肤", "infant", "acute", ("发热", "皮疹", "腹泻")),
    Condition(("急性扁桃体炎", "扁桃体炎"), "耳鼻喉", "any", "acute", ("咽痛", "发热", "食欲差")),
    Condition(("疱疹性咽峡炎",), "耳鼻喉", "child", "acute", ("发热", "口腔疱疹", "咽痛", "食欲差")),
    Condition(("急性中耳炎", "中耳炎"), "耳鼻喉", "child", "acute", ("耳痛", "发热", "流涕")),
    Condition(("过敏性鼻炎", "鼻炎"), "耳鼻喉", "any", "chronic", ("打喷嚏", "流涕", "鼻塞")),
    Condition(("鼻窦炎",), "耳鼻喉", "any", "subacute", ("鼻塞", "流涕", "咳嗽")),
    Condition(("腺样体肥大",), "耳鼻喉", "child", "chronic", ("打鼾", "鼻塞", "张口呼吸")),
    Condition(("慢性咽炎", "咽炎"), "耳鼻喉", "adult", "chronic", ("咽痛", "咳嗽", "声音嘶哑")),
    Condition(("急性喉炎", "喉炎"), "耳鼻喉", "child", "acute", ("声音嘶哑", "咳嗽", "发热")),
    Condition(("小儿腹泻", "腹泻"), "消化", "child", "acute", ("腹泻", "呕吐", "发热", "食欲差")),
    Condition(("急性胃肠炎", "胃肠炎"), "消化", "any", "acute", ("呕吐", "腹泻", "腹痛", "发热")),
    Condition(("轮状病毒肠炎",), "消化", "child", "acute", ("腹泻", "呕吐", "发热")),
    Condition(("小儿消化不良", "消化不良"), "消化", "child", "subacute", ("食欲差", "口臭", "腹胀", "便秘")),
    Condition(("功能性便秘", "便秘"), "消化", "any", "chronic", ("便秘", "腹胀", "食欲差")),
    Condition(("肠系膜淋巴结炎",), "消化", "child", "acute", ("腹痛", "发热", "呕吐")),
    Condition(("婴儿肠绞痛", "肠绞痛"), "消化", "infant", "subacute", ("哭闹", "腹胀")),
    Condition(("牛奶蛋白过敏",), "消化", "infant", "subacute", ("腹泻", "皮疹", "呕吐")),
    Condition(("慢性胃炎", "胃炎"), "胃", "adult", "chronic", ("胃痛", "腹胀", "嗳气", "反酸")),
    Condition(("胃食管反流病", "反流性食管炎"), "胃", "adult", "chronic", ("反酸", "烧心", "嗳气")),
    Condition(("幽门螺杆菌感染",), "胃", "adult", "chronic", ("胃痛", "口臭", "腹胀")),
    Condition(("功能性消化不良",), "胃", "adult", "chronic", ("腹胀", "嗳气", "食欲差")),
    Condition(("肠易激综合征",), "胃", "adult", "chronic", ("腹痛", "腹泻", "腹胀")),
    Condition(("湿疹",), "皮肤", "any", "subacute", ("皮疹", "瘙痒")),
    Condition(("急性荨麻疹", "荨麻疹"), "皮肤", "any", "acute", ("皮疹", "瘙痒")),
    Condition(("尿布皮炎", "红屁股"), "皮肤", "infant", "acute", ("皮疹", "哭闹")),
    Condition(("手足口病",), "皮肤", "child", "acute", ("手足疹", "发热", "口腔疱疹")),
    Condition(("接触性皮炎",), "皮肤", "adult", "acute", ("皮疹", "瘙痒")),
    Condition(("水痘",), "皮肤", "child", "acute", ("皮疹", "发热", "瘙痒")),
    Condition(("尿路感染", "泌尿系感染"), "泌尿", "any", "acute", ("尿频", "尿痛", "发热", "腹痛")),
    Condition(("急性结膜炎", "结膜炎"), "眼", "any", "acute", ("眼红", "瘙痒")),
    Condition(("缺铁性贫血", "贫血"), "血液", "any", "chronic", ("面色苍白", "乏力", "食欲差", "头晕")),
    Condition(("新生儿黄疸", "黄疸"), "黄疸", "infant", "subacute", ("皮肤黄染", "食欲差", "哭闹")),
)

# Questions about the history: (question, answers as (what is said, fact for the summary or "")).
HISTORY_CHILD: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("最近有没有着凉？", (("前几天降温没及时加衣服", "受凉后"), ("晚上睡觉老踢被子", "受凉后"), ("应该是没有吧", ""))),
    ("家里有人生病吗？", (("他爸爸前几天也不舒服", "有家人患病接触史"), ("幼儿园好几个小朋友请假了", "有患儿接触史"),
                         ("家里人都挺好的", ""))),
    ("以前有过类似情况吗？", (("去年换季的时候也这样过一次", "既往有类似发作"), ("这是第一次", "首次发病"),
                               ("小时候好像有过，记不太清了", ""))),
    ("晚上睡觉怎么样？", (("睡得不踏实，夜里醒好几回", "夜间睡眠差"), ("睡得还行", ""),
                         ("后半夜会哼哼唧唧的", "夜间睡眠欠安"))),
    ("小便正常吗？", (("小便正常", "小便正常"), ("尿得比平时少一点", "尿量稍减少"), ("颜色有点黄", ""))),
    ("体重多少？", (("二十六斤", ""), ("三十斤左右", ""), ("上周称的是三十四斤", ""), ("四十多斤", ""))),
    ("疫苗都按时打了吗？", (("都按时打了", ""), ("上个月刚打过一针", "近1月内有疫苗接种史"), ("有一针推迟了", ""))),
    ("平时吃饭挑食吗？", (("特别挑食，不爱吃青菜", "平素挑食"), ("还好，什么都吃", ""), ("就爱吃零食", "平素喜食零食"))),
    ("最近吃了什么特别的东西没有？", (("昨天吃了不少冰淇淋", "进食生冷后"), ("前天在外面吃了烧烤", "进食烧烤后"),
                                       ("没有，跟平时一样", ""))),
    ("出生的时候顺利吗？", (("顺产的，足月", ""), ("剖腹产，早产了两周", "既往早产史"))),
)
HISTORY_INFANT: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("是吃母乳还是奶粉？", (("纯母乳", "纯母乳喂养"), ("混合喂养", "混合喂养"), ("一直喝奶粉", "人工喂养"))),
    ("一天吃几次奶？", (("差不多三个小时一次", ""), ("一天七八次", ""), ("吃得比以前少了", "奶量减少"))),
    ("出生的时候多重？", (("六斤八两", ""), ("七斤多", ""), ("五斤二两，有点小", "低出生体重"))),
    ("大便什么颜色？", (("黄色的", ""), ("有点发绿", "大便偏绿"), ("颜色挺正常的", ""))),
    ("睡觉踏实吗？", (("睡着了容易惊醒", "睡眠欠安"), ("睡得挺好", ""))),
    ("是足月出生的吗？", (("足月的", ""), ("三十六周出生的", "早产"))),
)
HISTORY_ADULT: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("平时抽烟喝酒吗？", (("抽烟十几年了", "吸烟史10余年"), ("偶尔喝点酒", "偶有饮酒"), ("都不沾", ""))),
    ("以前有什么基础病吗？", (("没有，身体一直挺好", "既往体健"), ("有点高血压，一直在控制", "既往高血压病史"),
                             ("血糖有点高", "既往血糖偏高"))),
    ("最近工作累不累？", (("经常加班熬夜", "近期劳累"), ("压力挺大的", "近期精神压力大"), ("还行，不算累", ""))),
    ("发病前吃过什么特别的吗？", (("前天和朋友吃了火锅", "进食辛辣后"), ("喝了点冰啤酒", "进食生冷后"),
                                 ("没有，正常吃饭", ""))),
    ("睡眠怎么样？", (("睡不好，容易醒", "睡眠差"), ("睡眠还可以", ""))),
    ("以前有过这种情况吗？", (("之前也犯过，这次比较重", "既往有类似发作"), ("第一次", "首次发病"))),
    ("有没有吹空调或者淋雨？", (("办公室空调开得很低", "受凉后"), ("没有", ""))),
    ("家里人有类似症状吗？", (("我老公也有点不舒服", "家属有类似症状"), ("没有", ""))),
)

# Longer remarks a doctor makes about each kind of illness; they name no drug, exam or operation.
EXPLANATIONS: dict[str, tuple[str, ...]] = {
    "呼吸": ("这种情况大多数是病毒引起的，病程一般在一周左右", "咳嗽是身体的保护反应，把痰咳出来反而是好事",
             "晚上躺下以后鼻涕往后流，刺激咽喉，所以夜里咳得更明显", "换季的时候冷热交替，呼吸道特别容易出问题",
             "只要精神状态好，能吃能睡，一般问题不大", "体温高的时候手脚冰凉是正常的，说明还在升温",
             "痰多的时候多喝水能让痰变稀，容易咳出来", "这种咳嗽好起来会比较慢，可能要两三周才能完全好"),
    "耳鼻喉": ("鼻腔和耳朵是连着的，鼻涕多的时候容易影响到耳朵", "这个跟体质有关系，换季的时候容易反复",
               "嗓子的问题跟用嗓过度也有关系，要注意休息", "鼻子堵的时候睡觉会张嘴，早上起来嗓子会很干",
               "过敏的东西找到了并且避开，症状会减轻很多"),
    "消化": ("拉肚子最怕的是脱水，所以一定要注意补水", "秋冬季节这种肠炎很常见，多数是病毒引起的，有自限性",
             "孩子的脾胃比较弱，一次吃太多容易积食", "大便的次数和性状比颜色更重要，要注意观察",
             "如果出现眼窝凹陷、哭的时候没眼泪，说明脱水了，要赶紧就医", "饮食上先从米汤、稀粥这些容易消化的开始"),
    "胃": ("胃病三分治七分养，饮食习惯很关键", "情绪紧张也会影响胃的消化功能", "这种不适跟作息不规律关系很大",
           "空腹的时候疼得明显，吃点东西会缓解，这是比较典型的表现", "症状好了以后也别马上放开吃，要慢慢恢复"),
    "皮肤": ("皮肤的问题一般恢复得比较慢，要有耐心", "越挠越痒，越痒越挠，要尽量打断这个循环",
             "这种疹子一般不留疤，别担心", "洗澡太勤、水温太高都会破坏皮肤的屏障", "天气干燥的时候特别容易加重"),
    "泌尿": ("喝水少、憋尿都是常见的诱因", "这个病女性比较多见，跟生理结构有关系", "症状消失了不代表彻底好了，要按疗程来"),
    "眼": ("这种情况传染性比较强，家里人要注意", "眼睛分泌物多的时候用干净棉签轻轻擦掉",
           "一般一周左右能好，别太担心"),
    "血液": ("缺铁是慢慢形成的，补起来也需要时间，一般要两三个月", "饮食单一是很常见的原因",
             "脸色发白、容易累都跟血色素低有关系"),
    "黄疸": ("新生儿黄疸很常见，大部分是生理性的", "吃得多、拉得多，黄疸退得就快",
             "黄疸主要看数值和出现的时间，单看颜色不准", "母乳喂养的宝宝黄疸消退得可能慢一些"),
}
GENERAL_EXPLANATIONS = ("现在天气变化大，这类情况挺多的", "您也别太着急，大部分都能恢复得很好",
                        "用药期间注意观察，有变化随时跟我说", "网上问诊有局限，病情变化的话还是要线下就诊",
                        "我把需要注意的地方跟您说一下")

# A worried remark from the patient's side and the doctor's reply.
WORRIES_CHILD = (
    ("他从小体质就弱，一换季就生病", "体质需要慢慢调理，平时多带去户外活动"),
    ("我们这边医院排队太久了，所以先在网上问问", "理解，先按我说的处理，不好转再去医院"),
    ("昨晚一宿没怎么睡，一直在折腾", "辛苦了，孩子不舒服的时候家长确实很累"),
    ("奶奶非说是上火了，给喝了好多凉茶", "凉茶就别喝了，对孩子的脾胃不好"),
    ("是不是前几天带去游泳着凉了？", "有可能，受凉是常见的诱因"),
    ("他现在特别黏人，一放下就哭", "生病的时候孩子没有安全感，多陪陪他"),
    ("我是新手妈妈，什么都不懂，特别慌", "别慌，这种情况很常见，我慢慢跟您说"),
    ("明天还要送幼儿园，不知道行不行", "先在家休息一两天，好了再送"),
    ("他不肯吃药，一喂就吐出来", "可以少量多次喂，或者混在一点点果汁里"),
)
WORRIES_ADULT = (
    ("最近工作忙，一直没时间去医院", "身体要紧，该检查还是要检查"),
    ("我有点担心是不是什么大病", "从您说的情况看，不像是严重的问题"),
    ("上网查了一下，越查越害怕", "网上的信息不一定准确，别自己吓自己"),
    ("之前也这样过，自己就好了", "这次时间比较长，还是重视一下"),
    ("这几天难受得饭都吃不下", "理解，先把症状控制住就好了"),
    ("家里老人也有类似的毛病，会不会遗传？", "有一定的家族倾向，但生活方式影响更大"),
)

EVENT_SYMPTOMS = ("呕吐", "咳嗽", "腹泻", "腹痛", "流涕", "打喷嚏", "耳痛", "咽痛", "头晕")
# Categories spoken of with 用 rather than 吃.
APPLIED_CATEGORIES = ("外用药", "眼药", "鼻腔用药", "激素", "抗真菌药")
CHILD_WORDS = ("孩子", "宝宝", "儿子", "女儿", "闺女", "小孩", "宝贝")
CN = "零一二三四五六七八九十"

# What led up to the illness, as a parent or an adult patient tells it (a sentence that precedes the complaint).
CONTEXT_CHILD = ("前两天带{kw}出去玩，出了一身汗也没及时换衣服", "上周末降温了，幼儿园里好几个小朋友都感冒了",
                 "{kw}平时身体挺好的，很少生病", "最近天气忽冷忽热的，晚上睡觉总踢被子", "这次是从幼儿园回来以后开始的",
                 "前几天家里来了亲戚，{kw}跟着吃了不少零食", "上个月刚好了一次，这又开始了",
                 "我们是外地的，附近医院不太方便")
CONTEXT_ADULT = ("最近工作特别忙，经常熬夜", "前几天出差，一路上都没休息好", "我平时身体还可以，很少吃药",
                 "这个毛病断断续续有一段时间了，这次比较明显", "上周淋了点雨，当时没在意",
                 "这几天吃饭不太规律，饱一顿饥一顿的")
DOC_GREETINGS_CHILD = ("您好，我是儿科医生，请问{you}哪里不舒服？", "你好，请详细说一下孩子的情况",
                       "您好！您的问题我看到了，请问孩子现在主要是什么症状？", "你好，在的，孩子怎么了？",
                       "您好，很高兴为您解答，请问宝宝有什么不舒服？", "你好，我是接诊医生，先了解一下孩子的情况可以吗？",
                       "您好，请问是给孩子咨询吗？", "你好，孩子目前有哪些症状，持续多长时间了？",
                       "您好，我已经看到您填写的情况了，再跟您确认几个问题")
DOC_GREETINGS_ADULT = ("您好，我是接诊医生，请问哪里不舒服？", "你好，请描述一下您的症状", "您好，在的，请问有什么可以帮您？",
                       "你好，很高兴为你服务，请说说具体情况", "您好！请问这次主要是哪里不舒服？",
                       "你好，我是今天值班的医生，需要先问您几个问题", "您好，看到您的留言了，具体说说吧")


# Every span the list fields could hold, by field.
INVENTORY: dict[str, frozenset[str]] = {
    "药品名称": frozenset(n for ds in DRUG_TABLE.values() for d in ds for n in (d.name, d.alias) if n),
    "药物类别": frozenset(t for terms in CATEGORY_TERMS.values() for t in terms),
    "医疗检查": frozenset(EXAMS),
    "医疗操作": frozenset(OPERATIONS),
}


def _occurrences(text: str, term: str):
    start = text.find(term)
    while start >= 0:
        yield start, start + len(term)
        start = text.find(term, start + 1)


def unlisted_spans(text: str, found: dict[str, list[str]]) -> list[str]:
    """Inventory terms that occur in `text` outside every occurrence of a listed span; each would be a span the
    annotation misses (so 雾化吸入 is one even where 雾化 is listed, while 布洛芬 inside a listed 布洛芬混悬液 is not)."""
    listed = {s for spans in found.values() for s in spans}
    covered = [occ for span in listed for occ in _occurrences(text, span)]
    missed = set()
    for terms in INVENTORY.values():
        for term in terms:
            if term in listed or term not in text:
                continue
            if any(not any(a <= i and j <= b for a, b in covered) for i, j in _occurrences(text, term)):
                missed.add(term)
    return sorted(missed)


def cn_num(n: int) -> str:
    """1..99 in Chinese numerals; 2 alone reads 两, as in 两天."""
    if n == 2:
        return "两"
    if n <= 10:
        return CN[n]
    tens, ones = divmod(n, 10)
    return ("" if tens == 1 else CN[tens]) + "十" + (CN[ones] if ones else "")


# --------------------------------------------------------------------------------------------------------------
# One case: the facts are drawn first, the lines that state them are written in order, and the summaries are built
# from the same facts. Every extracted span is recorded at the moment it is written into a line.
# --------------------------------------------------------------------------------------------------------------

DOC, PAT = "医生", "患者"


@dataclass
class Facts:
    """What the dialogue states; the summaries are built only from these."""
    age_sum: str = ""
    sex: str = ""
    years: int = 0
    duration_sum: str = ""
    positives: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    fever_max: str = ""
    history: list[str] = field(default_factory=list)
    past_drugs: list[str] = field(default_factory=list)
    past_categories: list[str] = field(default_factory=list)
    past_ops: list[str] = field(default_factory=list)
    effect: str = ""
    results: list[str] = field(default_factory=list)
    diagnosis: str = ""
    advice: list[str] = field(default_factory=list)
    quote: str = ""


class Builder:
    """Draws one case and writes its dialogue turn by turn."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.child = rng.random() < 0.62
        allowed = ("child", "infant", "any") if self.child else ("adult", "any")
        self.condition = rng.choice([c for c in CONDITIONS if c.who in allowed])
        self.group = GROUPS[self.condition.group]
        self.infant = self.condition.who == "infant" or (self.child and rng.random() < 0.12)
        self.kw = rng.choice(("宝宝", "孩子")) if self.infant else rng.choice(CHILD_WORDS)
        self.you = rng.choice(("孩子", "宝宝")) if self.child else rng.choice(("您", "你"))
        self.lines: list[tuple[str, str]] = []
        self.found: dict[str, list[str]] = {k: [] for k in LIST_KEYS}
        self.facts = Facts()
        # Field emptiness, drawn to match the chapter's test set (SPEC §5).
        self.want_drug = rng.random() < 0.80
        self.want_cat = rng.random() < (0.86 if self.want_drug else 0.33)
        self.want_exam = rng.random() < 0.755
        self.want_result = self.want_exam and rng.random() < 0.67
        self.want_op = rng.random() < 0.515
        self.drugs = self._draw_drugs()
        self.remarks = list(EXPLANATIONS[self.condition.group] + GENERAL_EXPLANATIONS)
        rng.shuffle(self.remarks)

    # ---- small helpers ---------------------------------------------------------------------------------------
    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def doc(self, text: str) -> None:
        self.lines.append((DOC, text))

    def pat(self, text: str) -> None:
        self.lines.append((PAT, text))

    def note(self, key: str, term: str) -> str:
        if term not in self.found[key]:
            self.found[key].append(term)
        return term

    def drug(self, d: Drug) -> str:
        return self.note("药品名称", d.name)

    def cat(self, category: str) -> str:
        return self.note("药物类别", self.pick(CATEGORY_TERMS[category]))

    def exam(self, name: str) -> str:
        return self.note("医疗检查", name)

    def op(self, name: str) -> str:
        return self.note("医疗操作", name)

    def lay(self, symptom: str) -> str:
        return self.pick(SYMPTOMS[symptom][0])

    def dose(self, d: Drug) -> str:
        dose = self.pick(ROUTES[d.route][2] if self.child else ROUTES[d.route][3])
        if self.chance(0.4):
            dose += "，" + self.pick(("先用三天看看效果", "症状好了就可以停", "连用五到七天", "不要自己加量",
                                     "用完了再跟我说说情况", "和别的药隔开半小时"))
        return dose

    @property
    def subj(self) -> str:
        return self.kw if self.child else "我"

    # ---- drawing the facts ------------------------------------------------------------------------------------
    def _draw_drugs(self) -> list[Drug]:
        if not self.want_drug:
            return []
        n = self.pick((1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 5, 6, 8, 10))
        keys = self.group.drugs
        chosen: list[Drug] = []
        for _ in range(n * 4):
            if len(chosen) == n:
                break
            d = self.pick(DRUG_TABLE[self.pick(keys[:4] if self.chance(0.5) else keys)])
            if d.adult_only and self.child:
                continue
            if all(d.name != c.name for c in chosen):
                chosen.append(d)
        return chosen

    def _age(self) -> str:
        """Draws the age; returns it as the parent or patient says it."""
        f, rng = self.facts, self.rng
        if not self.child:
            f.years = rng.randint(18, 72)
            f.age_sum = f"{f.years}岁"
            return self.pick((f"{f.years}", f"{f.years}岁", f"{cn_num(f.years)}岁" if f.years < 100 else ""))
        if self.infant:
            months = rng.randint(0, 11)
            if months == 0:
                days = rng.randint(5, 28)
                f.age_sum = f"出生{days}天"
                return self.pick((f"出生{days}天", f"生下来{cn_num(days)}天"))
            f.age_sum = f"{months}月龄"
            return self.pick((f"{months}个月", f"{cn_num(months)}个月", f"{cn_num(months)}个多月"))
        years = self.pick((1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 12))
        months = self.pick((0, 0, 0, 6, rng.randint(1, 11)))
        f.years = years
        if months == 0:
            f.age_sum = f"{years}岁"
            return self.pick((f"{years}岁", f"{cn_num(years)}岁", f"{years}周岁"))
        if months == 6 and years < 6:
            f.age_sum = f"{years}岁半"
            return self.pick((f"{cn_num(years)}岁半", f"{years}岁半"))
        f.age_sum = f"{years}岁{months}个月"
        return self.pick((f"{years}岁{months}个月", f"{cn_num(years)}岁{cn_num(months)}个月"))

    def _duration(self) -> str:
        """Draws how long the illness has lasted, for the condition's course; returns it as said."""
        course, f = self.condition.course, self.facts
        if course == "acute" or (course == "subacute" and self.chance(0.3)):
            days = self.pick((1, 1, 2, 2, 3, 3, 3, 4, 5, 6, 7))
            if days == 7 and self.chance(0.6):
                f.duration_sum = "1周"
                return self.pick(("一周", "一个星期"))
            f.duration_sum = f"{days}天"
            if days == 1:
                return self.pick(("一天", "一天多", "一天半"))
            return self.pick((f"{cn_num(days)}天", f"{days}天"))
        if course == "subacute":
            said, f.duration_sum = self.pick((("一个多星期", "1周余"), ("十来天", "10余天"), ("半个月", "半月"),
                                              ("二十多天", "20余天"), ("两个星期", "2周"), ("一个月", "1月")))
            return said
        said, f.duration_sum = self.pick((("一个多月", "1月余"), ("两三个月", "2-3月"), ("半年", "半年"),
                                          ("大半年", "半年余"), ("一年多", "1年余"), ("三个月", "3月"),
                                          ("好几年", "数年")))
        return said

    # ---- the dialogue, in order --------------------------------------------------------------------------------
    def build(self) -> None:
        cond = self.condition
        age_said = self._age()
        if not self.child:
            self.facts.sex = self.pick(("男", "女"))
        said_dur = self._duration()
        main = cond.symptoms[0]
        extra = [s for s in cond.symptoms[1:] if self.chance(0.55)]
        past, future = self._split_drugs()
        target = min(68, max(21, round(self.rng.gauss(42, 11))))
        self._opening(main, said_dur, extra)
        self._filler(0.35)
        self._ask_age(age_said)
        self._ask_symptoms(main, extra)
        self._filler(0.3)
        history_at = len(self.lines)
        if past or (self.want_cat and self.chance(0.35)):
            self._past_drugs(past)
        past_op = self.want_op and self.chance(0.35)
        if past_op:
            self._past_op()
        if self.want_result:
            self._past_exams()
        self._filler(0.4)
        self._diagnosis()
        explain_at = len(self.lines)
        self._prescribe(future, need_cat=self.want_cat and not self.found["药物类别"])
        if self.want_op and (not past_op or self.chance(0.4)):
            self._suggest_op()
        if self.want_exam and (not self.want_result or self.chance(0.35)):
            self._suggest_exams()
        self._lifestyle()
        self._patient_questions()
        self._closing()
        self._pad(target, history_at, explain_at)

    def _split_drugs(self) -> tuple[list[Drug], list[Drug]]:
        cut = self.rng.randint(0, len(self.drugs)) if self.drugs else 0
        if self.chance(0.4):
            cut = min(cut, 1)
        return self.drugs[:cut], self.drugs[cut:]

    def _opening(self, main: str, said_dur: str, extra: list[str]) -> None:
        f = self.facts
        greetings = DOC_GREETINGS_CHILD if self.child else DOC_GREETINGS_ADULT
        self.doc(self.pick(greetings).format(you=self.you))
        greeted = self.chance(0.3)
        if greeted:
            self.pat(self.pick(("医生你好呀", "医生您好", "您好，在的", "你好，麻烦您了", "在的，医生好")))
            if self.chance(0.5):
                self.doc(self.pick(("您说", "嗯，您请讲", "请讲", "好的，您说说看")))
        opener = self.pick(("", "想咨询一下，", "麻烦问一下，") if greeted else ("", "医生你好，", "你好，", "想咨询一下，"))
        if self.chance(0.5):
            context = self.pick(CONTEXT_CHILD if self.child else CONTEXT_ADULT).format(kw=self.kw)
            if self.chance(0.5):
                self.pat(opener + context)
                opener = ""
            else:
                opener += context + "，"
        owner = f"我家{self.kw}" if self.child and self.chance(0.5) else self.subj
        sym = self.lay(main)
        said = self.pick((f"{owner}{sym}{said_dur}了", f"{owner}从{said_dur}前开始{sym}", f"{owner}这{said_dur}一直{sym}",
                          f"{owner}{said_dur}前开始{sym}，到现在还没好"))
        f.positives.append(main)
        wrong_dur = self.pick(("两天", "三天", "一周", "五天", "十天"))
        if self.chance(0.15) and wrong_dur != said_dur:
            # the patient gets the duration wrong and corrects it; the summary keeps the corrected one
            self.pat(opener + said.replace(said_dur, wrong_dur, 1))
            self.pat(self.pick((f"不对，说错了，是{said_dur}", f"哦不，应该是{said_dur}了", f"更正一下，{said_dur}了")))
        else:
            if extra and self.chance(0.6):
                said += self.pick(("，还", "，同时", "，这两天还")) + self.lay(extra[0])
                f.positives.append(extra.pop(0))
            if self.chance(0.25):
                self.pat(opener + said + "，")
                self.pat(self.pick(("不知道是怎么回事", "也不知道要不要紧", "怎么办啊", "该吃点什么药呢？",
                                    "有点担心", "着急死了")))
            else:
                self.pat(opener + said + self.pick(("", "。", "，怎么办？", "，请问怎么回事？", "，需要吃药吗？",
                                                    "，想问问需要注意些什么", "，在家观察了两天也不见好",
                                                    "，不知道要不要去医院")))
        if self.chance(0.01):
            f.quote = self.pick(("像有东西卡着", "一阵一阵的", "喘不上气", "浑身不得劲"))
            who = self.pick(("他", "她")) if self.child else "我"
            self.pat(f"用{who}自己的话说就是'{f.quote}'")

    def _ask_age(self, age_said: str) -> None:
        if self.child:
            q = self.pick((f"{self.you}今年多大？", f"{self.you}几岁了？", f"{self.you}现在多大？"))
            if self.infant:
                q = self.pick(("宝宝几个月了？", "宝宝现在多大了？", "宝宝出生多久了？"))
            self.doc(q)
            if self.chance(0.1):
                self.pat(self.pick(("我算算", "等一下，我看看出生证明")))
            self.pat(age_said + self.pick(("", "了", "。", "，刚过完生日")))
        elif self.chance(0.6):
            self.doc(self.pick(("请问您多大年纪？", "您今年多大了？", "方便说一下年龄和性别吗？")))
            sex = "男的" if self.facts.sex == "男" else "女的"
            self.pat(self.pick((age_said, f"{sex}，{age_said}", f"{age_said}，{sex}")))
        else:
            self.facts.age_sum = ""

    def _ask_symptoms(self, main: str, extra: list[str]) -> None:
        f = self.facts
        negatives = [s for s in self.group.negatives if s not in self.condition.symptoms]
        self.rng.shuffle(negatives)
        asks = [(s, True) for s in extra] + [(s, False) for s in negatives[: self.rng.randint(1, 3)]]
        self.rng.shuffle(asks)
        if "发热" in (main, *extra) and self.chance(0.8):
            asks = [("发热", True)] + [a for a in asks if a[0] != "发热"]
        skipped = False
        for symptom, present in asks:
            if symptom == "发热" and present:
                self._ask_fever()
                continue
            q = self.pick(SYMPTOMS[symptom][1])
            if self.chance(0.3):
                q = self.pick(("好的，", "了解了，", "明白，那", "嗯，我再问一下，", "还有，")) + q
            self.doc(q)
            if not skipped and self.chance(0.12):
                # two questions in a row; the patient answers only the second one
                skipped = True
                continue
            if self.chance(0.07):
                self.pat(self.pick(("这个我没注意", "不太清楚，我问问家里人", "嗯……说不好", "好像有吧，我也不确定")))
                continue
            lay = self.lay(symptom)
            if present:
                detail = self.pick(("晚上明显一些", "不算太厉害", "挺厉害的", "白天多一点", "时好时坏",
                                    "这两天比刚开始重了", "今天稍微好一点"))
                answer = self.pick(("嗯", "是的", f"嗯，{lay}", f"{lay}，{detail}", f"对，{lay}", f"有，{detail}"))
                if self.chance(0.3):
                    answer += "，" + self.pick(("晚上睡觉的时候翻来覆去的", "我们也不知道该怎么办", "吃了东西以后会好一点",
                                               "比前两天严重了一些", "白天忙起来就不太明显", "家里人都挺着急的",
                                               "看着挺难受的"))
                self.pat(answer)
                if symptom not in f.positives:
                    f.positives.append(symptom)
            elif symptom in EVENT_SYMPTOMS and self.chance(0.15):
                # denies, then remembers: the summary follows the correction
                self.pat(self.pick(("没有吧", "好像没有")))
                self.pat(self.pick((f"哦，想起来了，昨天晚上也{lay}", f"不对，前天有点{lay}", f"等下，今天早上也{lay}了")))
                f.positives.append(symptom)
            else:
                self.pat(self.pick(("没有", "这个倒没有", "没") + SYMPTOMS[symptom][3] * 2))
                f.negatives.append(symptom)

    def _ask_fever(self) -> None:
        f = self.facts
        self.doc(self.pick(("体温高吗？最高多少度？", "有没有发烧？", "体温最高到多少？", "烧到多少度了？")))
        temp = f"{self.rng.randint(378, 401) / 10:.1f}"
        self.pat(self.pick((f"最高{temp}度", f"烧到{temp}", f"昨晚量的{temp}", f"{temp}度，反反复复的",
                            f"有，腋下量的{temp}")))
        f.fever_max = temp
        if "发热" not in f.positives:
            f.positives.append("发热")

    def _past_drugs(self, past: list[Drug]) -> None:
        f = self.facts
        self.doc(self.pick(("用过什么药吗？", f"给{self.you}用过药没有？" if self.child else "自己用过药没有？",
                            "之前用的什么药？", "这几天用药了吗？效果怎么样？")))
        if past:
            names = [self.drug(d) for d in past[:3]]
            f.past_drugs += names
            said = "和".join(names) if len(names) <= 2 else "、".join(names[:-1]) + "还有" + names[-1]
            verb = "吃" if all(d.route == "oral" for d in past[:3]) else "用"
            if self.chance(0.2):
                self.pat(self.pick(("等一下，我看看药盒", "稍等我去拿药盒", "嗯……我找找")))
            self.pat(self.pick((f"{verb}了{said}", f"在家{verb}了{said}", f"药店买的{said}", f"之前医生开的{said}")))
            for d in past[3:]:
                self.pat(self.pick((f"还有{self.drug(d)}", f"对了，还{ROUTES[d.route][0]}了{self.drug(d)}")))
                f.past_drugs.append(d.name)
            if self.want_cat and self.chance(0.75):
                d = self.pick(past)
                term = self.cat(d.category)
                note = self.pick(("要按疗程用", "不能自己随便停", "一般用三到五天", "用法要注意"))
                asked = self.chance(0.3)
                self.doc(self.pick((f"{d.name}是{term}", f"{d.name}属于{term}，{note}")) if not asked else
                         f"嗯，{d.name}是{term}，用了几天了？")
                if asked:
                    self.pat(self.pick(("两天", "三天了", "就用了一次", "四五天了")))
            alias = next((d for d in past if d.alias), None)
            if alias and self.chance(0.5):
                self.pat(f"{self.note('药品名称', alias.alias)}也是这个吧？")
                self.doc(self.pick(("对，是同一个药", "是的，一个是商品名", "对，成分一样")))
        else:
            category = self.pick(self.group.drugs).split(":")[0]
            term = self.cat(category)
            verb = "用" if category in APPLIED_CATEGORIES else "吃"
            f.past_categories.append(term)
            self.pat(self.pick((f"{verb}了点{term}，名字记不住了", f"家里有{term}，{verb}了两天", f"就{verb}了点{term}")))
        effect = self.pick((("效果不明显", "效果不佳"), ("好一点了", "症状稍缓解"), ("没什么用", "效果不佳"),
                            ("用了好像好些了，但还没好利索", "症状有所好转")))
        if self.chance(0.75):
            self.pat(effect[0])
            f.effect = effect[1]

    def _past_op(self) -> None:
        op = self.pick(self.group.ops)
        n = cn_num(self.rng.randint(1, 5))
        where = self.pick(("在诊所", "在社区医院", "在医院", "之前"))
        self.op(op)
        if OPERATIONS[op] == "v":
            self.pat(self.pick((f"{where}{op}了{n}天", f"{where}{op}了{n}次")))
        else:
            self.pat(self.pick((f"{where}做了{op}", f"{where}做过{n}次{op}")))
        if self.chance(0.5):
            self.doc(self.pick(("做完有好转吗？", "效果怎么样？")))
            self.pat(self.pick(("好了一点", "没啥变化", "当时好了，后来又反复")))
        self.facts.past_ops.append(op)

    def _past_exams(self) -> None:
        f = self.facts
        self.doc(self.pick(("去医院做过检查吗？", "做过什么检查没有？", "之前查过什么吗？", "有检查结果吗？")))
        names = list(self.group.exams)
        self.rng.shuffle(names)
        for e in names[: self.pick((1, 1, 1, 2, 2, 3, 4))]:
            verb, results = EXAMS[e]
            said, summary = self.pick(results + GENERIC_RESULTS if self.chance(0.3) else results)
            when = self.pick(("昨天", "前天", "今天上午", "前几天", "上周", "刚才"))
            self.exam(e)
            if self.chance(0.3):
                self.pat(f"{when}{verb}了{e}")
                if self.chance(0.3):
                    self.pat("[图片]")
                    self.doc(self.pick(("图片看到了", "收到，我看一下", "照片有点模糊，结果是多少？")))
                self.pat(said)
            else:
                self.pat(self.pick((f"{when}{verb}了{e}，{said}", f"{verb}过{e}，{said}", f"{e}{verb}了，{said}")))
            if summary.startswith(e[:2]) or (summary not in BARE_RESULTS and self.chance(0.4)):
                f.results.append(summary)
            else:
                f.results.append(e + self.pick(("示", "：", "提示")) + summary)
            if self.chance(0.35):
                self.doc(self.pick(("嗯，这个结果提示有炎症", "这个结果问题不大", "明白了", "这个要结合症状来看")))

    def _diagnosis(self) -> None:
        names = self.condition.diagnoses
        said = self.pick(names)
        self.facts.diagnosis = self.pick((names[0], names[0], said, f"{names[0]}？", f"考虑{names[0]}"))
        line = self.pick((f"根据您说的情况，考虑是{said}", f"从症状来看，{self.you}这是{said}", f"初步判断是{said}",
                          f"这种情况多半是{said}，不用太紧张", f"目前看像{said}，最好还是当面检查确认一下",
                          f"结合您说的，应该是{said}"))
        if self.chance(0.4):
            line += "，" + self.remarks.pop()
        self.doc(line)
        if self.chance(0.4):
            self.pat(self.pick(("严重吗？", "要紧吗？", "那该怎么办？", "会不会加重啊？", "需要住院吗？")))
            self.doc(self.pick(("问题不算大，注意护理就行", "不算严重，按我说的处理", "目前看不严重，注意观察",
                                "一般不需要住院，在家护理观察就可以")))

    def _prescribe(self, future: list[Drug], need_cat: bool) -> None:
        f = self.facts
        for d in future:
            name = self.drug(d)
            verb = ROUTES[d.route][0]
            style = self.rng.randrange(5)
            if d.route == "inh":
                if self.want_op:
                    self.doc(f"用{name}{self.op('雾化')}，{self.dose(d)}")
                else:
                    self.doc(f"{name}吸入，{self.dose(d)}")
            elif style == 0:
                who = f"给{self.you}" if self.child else ""
                self.doc(f"可以{who}{verb}点{name}，{self.dose(d)}")
            elif style == 1:
                self.doc(f"建议{'口服' if d.route == 'oral' else '用'}{name}")
                if self.chance(0.5):
                    self.pat(self.pick((f"{name}怎么{verb}？", f"怎么{verb}呢？", f"一天{verb}几次？")))
                    self.doc(self.dose(d))
            elif style == 2:
                self.pat(self.pick((f"家里有{name}，能{verb}吗？", f"{name}可以吗？", f"要不要{verb}{name}？")))
                self.doc(self.pick(("可以的", f"可以{verb}", "这个可以，对症的")) + "，" + self.dose(d))
            elif style == 3:
                self.doc(self.pick((f"先用{name}试试", f"再加一个{name}", f"另外配合{name}")))
            else:
                self.doc(f"{name}{self.dose(d)}")
            if d.alias and self.chance(0.15):
                self.doc(f"也就是{self.note('药品名称', d.alias)}")
            if self.want_cat and (need_cat or self.chance(0.6)):
                term = self.cat(d.category)
                self.doc(self.pick((f"这个是{term}", f"{name}属于{term}", f"这个药是{term}，不能随便多用",
                                    f"用{term}一定要按量")))
                need_cat = False
            if len(f.advice) < 2:
                f.advice.append(self.pick(ROUTES[d.route][1]).format(name))
        if need_cat or (self.want_cat and self.chance(0.4)):
            category = self.pick(self.group.drugs).split(":")[0]
            term = self.cat(category)
            self.pat(self.pick((f"要不要用{term}？", f"需要用{term}吗？", f"用不用{term}？")))
            if self.chance(0.4):
                self.doc(self.pick((f"可以适当用点{term}", f"需要的话可以用{term}")))
                f.advice.append(f"适当使用{term}")
            else:
                self.doc(self.pick((f"目前不需要{term}", f"不建议随便用{term}", "暂时不用")))

    def _suggest_op(self) -> None:
        op = self.pick(self.group.ops)
        self.op(op)
        if OPERATIONS[op] == "v":
            line = self.pick((f"可以去医院{op}", f"必要时{op}", f"建议{op}，效果会快一些", f"每天{op}一到两次",
                              f"如果还不好就得{op}了"))
        else:
            line = self.pick((f"可以做个{op}", f"建议做{op}", f"必要时考虑{op}", f"可以试试{op}"))
        self.doc(line)
        self.facts.advice.append(self.pick((op, f"必要时{op}", f"{op}治疗")))
        if self.chance(0.3):
            question, answer = self.pick(((f"{op}疼不疼啊？", "不怎么疼，别担心"), (f"{op}要去大医院吗？", "社区医院就能做"),
                                          (f"一定要{op}吗？", "看情况，先观察两天再说")))
            self.pat(question)
            self.doc(answer)
        op2 = self.pick(self.group.ops)
        if op2 != op and self.chance(0.4):
            self.pat(self.pick((f"{self.op(op2)}行不行？", f"听说{self.op(op2)}也管用？")))
            self.doc(self.pick(("也可以", "暂时不需要", "一般不建议")))

    def _suggest_exams(self) -> None:
        names = [e for e in self.group.exams if e not in self.found["医疗检查"]]
        self.rng.shuffle(names)
        chosen = names[: self.pick((1, 2, 2, 2, 3, 3, 4))]
        if not chosen:
            return
        for e in chosen:
            self.exam(e)
        verb = EXAMS[chosen[0]][0]
        joined = "和".join(chosen) if len(chosen) <= 2 else "、".join(chosen)
        self.doc(self.pick((f"建议去医院{verb}一下{joined}", f"最好{verb}个{joined}看看", f"必要时{verb}{joined}",
                            f"先{verb}一下{joined}，明确一下")))
        done = "" if joined.endswith(("检查", "检测", "试验")) else "检查"
        self.facts.advice.append(self.pick((f"完善{joined}{done}", f"查{joined}", f"必要时查{joined}")))
        if self.chance(0.3):
            self.pat(self.pick(("要空腹吗？", "在哪里查？", "当天能出结果吗？", "必须要查吗？")))
            if self.chance(0.8):
                self.doc(self.pick(("不用空腹", "社区医院就能查", "一般当天就有结果", "查一下更放心")))

    def _lifestyle(self) -> None:
        items = list(self.group.advice)
        self.rng.shuffle(items)
        chosen = items[: self.pick((1, 1, 2, 2, 3))]
        if len(chosen) > 1 and self.chance(0.5):
            self.doc(self.pick(("平时", "另外", "回去以后", "")) + "，".join(said for said, _ in chosen))
        else:
            for said, _ in chosen:
                self.doc(self.pick(("平时", "另外", "注意", "")) + said)
        self.facts.advice += [summary for _, summary in chosen]
        if not self.facts.quote and self.chance(0.006):
            self.doc('记住"少量多次"这个原则')
            self.facts.advice.append('遵循"少量多次"原则')

    def _patient_questions(self) -> None:
        years = self.facts.years
        questions = [
            ("需要忌口吗？", ("少吃辛辣油腻的，水果可以正常吃", "清淡为主就行，别吃太咸太甜的"), "忌辛辣油腻"),
            ("多久能好？", ("一般一周左右会慢慢好转，每个人情况不一样", "按时用药的话三五天会好转，完全恢复要久一点"), ""),
            ("会传染吗？", ("有一定传染性，注意隔离，家里人勤洗手", "一般不传染，不用太担心"), ""),
            ("能洗澡吗？", ("可以洗，洗完马上擦干，别着凉", "可以，水温合适就行，时间别太长"), "洗澡后注意保暖"),
            ("晚上总是睡不好怎么办？", ("睡前别吃太多，保持屋里安静", "先把症状控制住，睡眠会好起来"), ""),
            ("要不要去医院？", ("暂时可以在家观察，加重了再去", "如果明天还不好就去医院看看"), "居家观察，加重时就医"),
            ("会不会反复？", ("注意护理的话一般不会", "有可能，要注意预防"), ""),
        ]
        if not self.child:
            questions.append(("能正常上班吗？", ("最好休息两天", "症状轻的话可以"), "适当休息"))
        elif not self.infant and years >= 3:
            place = "上学" if years >= 6 else "去幼儿园"
            questions.append((f"还能{place}吗？", ("最好休息两天", "症状轻的话可以"), "适当休息"))
        self.rng.shuffle(questions)
        for q, answers, summary in questions[: self.pick((0, 1, 1, 2, 2, 3))]:
            self.pat(self.pick(("", "", "我还想问一下，", "对了医生，", "再问个问题，")) + q)
            if self.chance(0.15):
                continue  # left unanswered
            self.doc(self.pick(answers))
            if summary and self.chance(0.5):
                self.facts.advice.append(summary)
            self._filler(0.3)

    def _closing(self) -> None:
        # a recap repeats only what was already said, leaving out any summary that would name a new span
        items = [a for a in dict.fromkeys(self.facts.advice[:5]) if not unlisted_spans(a, self.found)]
        if items and self.chance(0.4):
            recap = "，".join(items)
            self.doc(self.pick(("总结一下：", "我再给您整理一下：", "简单说就是", "回去以后记住这几点：")) + recap)
            if self.chance(0.5):
                self.pat(self.pick(("好的，我都记下了", "嗯嗯，我截图保存了", "明白，我按这个来")))
        if self.chance(0.5):
            self.doc(self.pick(("还有别的想问的吗？", "您还有其他疑问吗？", "还有需要问的吗？")))
            if self.chance(0.8):
                self.pat(self.pick(("没有了，多谢医生", "暂时没有了", "没了，麻烦您了", "没有了，太感谢了")))
        else:
            self.pat(self.pick(("好的，多谢医生", "明白了，谢谢", "好的，我先按您说的做", "行，那我先观察观察")))
        self.doc(self.pick(("不客气，祝孩子早日康复" if self.child else "不客气，祝您早日康复",
                            "不用客气，有问题随时留言", "应该的，有变化再联系我", "好的，注意观察，再见",
                            "不客气，用药以后有什么变化可以随时在这里留言，我看到会尽快回复",
                            "别客气，如果症状加重或者出现新的情况，一定要及时去医院就诊")))
        if self.chance(0.3):
            self.pat(self.pick(("再见", "谢谢，再见", "行，好的")))

    def _filler(self, p: float) -> None:
        if not self.chance(p):
            return
        pool = [
            (DOC, "您好，还在吗？"), (DOC, "好的，我再问几个问题"), (DOC, "嗯，明白"), (DOC, "别着急，慢慢说"),
            (DOC, "理解您的心情"), (DOC, "收到"), (PAT, "在的在的"), (PAT, "刚才信号不好"), (PAT, "稍等一下"),
            (PAT, "不好意思，回复慢了"), (PAT, "哦哦"), (PAT, "这样啊"), (PAT, "嗯嗯，我记下了"),
            (PAT, "您说得对"), (DOC, "嗯嗯"), (PAT, "嗯"),
        ]
        if self.child:
            pool += [(PAT, f"刚才{self.kw}哭了，不好意思"), (PAT, "我去冲个奶粉，马上回来"),
                     (PAT, f"{self.kw}奶奶说是着凉了"), (PAT, f"{self.kw}现在睡着了"), (DOC, "没关系，不着急")]
        else:
            pool += [(PAT, "我在上班，回复可能慢点"), (PAT, "刚开完会"), (DOC, "没关系")]
        for _ in range(2 if self.chance(0.3) else 1):
            self.lines.append(self.pick(pool))

    def _pad(self, target: int, history_at: int, explain_at: int) -> None:
        """Grow the dialogue towards `target` lines with exchanges that name no extracted span, so the order of
        first mentions is unchanged: history questions before the diagnosis, remarks and worries later on."""
        lines = self.lines
        history = list(HISTORY_INFANT if self.infant else HISTORY_CHILD if self.child else HISTORY_ADULT)
        self.rng.shuffle(history)
        remarks = self.remarks
        worries = list(WORRIES_CHILD if self.child else WORRIES_ADULT)
        self.rng.shuffle(worries)

        def slot(lo: int) -> int | None:
            # right after a doctor's statement, so no question or worry is separated from its reply
            spots = [i for i in range(max(lo, 1), len(lines))
                     if lines[i - 1][0] == DOC and not lines[i - 1][1].endswith("？")]
            return self.pick(spots) if spots else None

        while len(lines) < target and (history or remarks or worries):
            kind = self.rng.randrange(3)
            if kind == 0 and history:
                question, answers = history.pop()
                said, fact = self.pick(answers)
                if fact:
                    self.facts.history.append(fact)
                lines[history_at:history_at] = [(DOC, question), (PAT, said)]
                explain_at += 2
            elif kind == 1 and remarks:
                remark = remarks.pop()
                if remarks and self.chance(0.5):
                    remark += "。" + remarks.pop()
                block = [(DOC, remark)]
                if self.chance(0.3):
                    block.append((PAT, self.pick(("明白了", "原来是这样", "哦，知道了", "嗯嗯，那我就放心了",
                                                  "好的，我注意一下"))))
                at = slot(explain_at)
                if at is not None:
                    lines[at:at] = block
            elif kind == 2 and worries:
                worry, reply = worries.pop()
                at = slot(history_at)
                if at is not None:
                    lines[at:at] = [(PAT, worry), (DOC, reply)]
                    if at <= explain_at:
                        explain_at += 2

    # ---- summaries ---------------------------------------------------------------------------------------------
    def summaries(self) -> dict[str, str]:
        f = self.facts
        subject = "患者"
        if self.child:
            subject = self.pick(("患儿", f"{f.age_sum}患儿", f"患儿{f.age_sum}，"))
        elif f.age_sum and self.chance(0.5):
            subject = f"患者{f.sex}，{f.age_sum}，"
        main, *others = f.positives
        triggers = [h for h in f.history if h.endswith("后")]
        trigger = triggers[0] if triggers and self.chance(0.7) else ""
        parts = [self.pick((f"{f.duration_sum}前{trigger}出现{main}", f"{trigger}{main}{f.duration_sum}"))]
        if others:
            parts.append("伴" + "、".join(others[: self.pick((2, 3))]))
        if f.fever_max:
            parts.append(f"最高体温{f.fever_max}℃")
        rest = [h for h in f.history if not h.endswith("后")]
        if rest and self.chance(0.4):
            parts.append(rest[0])
        if f.negatives:
            parts.append("、".join(SYMPTOMS[s][2] for s in f.negatives[: self.pick((1, 2))]))
        if f.quote:
            parts.append(f"自述'{f.quote}'")
        if f.past_drugs:
            oral = all(d.route == "oral" for d in self.drugs if d.name in f.past_drugs[:3])
            parts.append(self.pick(("自行服用", "曾服用", "已口服") if oral else ("曾使用", "已用", "自行使用"))
                         + "、".join(f.past_drugs[:3]))
        elif f.past_categories:
            parts.append(f"曾服用{f.past_categories[0]}")
        if f.past_ops:
            parts.append(f"曾行{f.past_ops[0]}")
        if f.effect and (f.past_drugs or f.past_categories):
            parts.append(f.effect)
        history = (subject + "，".join(parts)).replace("，，", "，") + self.pick(("。", "。", ""))
        advice = "，".join(dict.fromkeys(f.advice[:4])) + self.pick(("。", ""))
        return {"现病史": history, "辅助检查": "，".join(f.results[:2]), "诊断结果": f.diagnosis, "医疗建议": advice}


def make_record(seed: int, index: int) -> dict:
    """Record `index` of the data set drawn with `seed`; redrawn until it fits the real data's ranges."""
    rng = random.Random(seed * 1_000_003 + index)
    while True:
        b = Builder(rng)
        b.build()
        text = "".join(f"{speaker}: {line}\n" for speaker, line in b.lines)
        extract = {k: list(b.found[k]) for k in LIST_KEYS}
        extract.update(b.summaries())
        extract = {k: extract[k] for k in EXTRACT_KEYS}
        out_len = len(json.dumps(extract, ensure_ascii=False)) + len("```json\n\n```")
        fits = 20 <= len(b.lines) <= 70 and 300 <= len(text) <= 1300 and 150 <= out_len <= 310
        if fits and not unlisted_spans(text, b.found):
            return {"dialogue_text": text, "extract_text": extract}


def generate(num_records: int, seed: int) -> list[dict]:
    return [make_record(seed, i) for i in range(num_records)]


def dumps_records(records: list[dict]) -> str:
    """A JSON array with one record per line, so diffs and greps stay readable."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    records = generate(args.num_records, args.seed)
    atomic_write_text(args.output, dumps_records(records))
    print(f"wrote {len(records)} records to {args.output}")


if __name__ == "__main__":
    main()
